"""Settings of ``tandem serve`` and ``tandem quantize --serve``; each field mirrors a flag."""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field
from typing import Any

from tandemlm.deploy.server.guards import LOCAL_HOSTS, host_name

WILDCARD_BINDS = ("0.0.0.0", "::", "")


@dataclass
class ServerConfig:
    """Where and how the OpenAI server listens, and what it admits. Errors name the field."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 0.0.0.0 exposes it to the network."})
    port: int = field(default=8000, metadata={"help": "TCP port (1-65535)."})
    api_key: str | None = field(default=None, metadata={"help": "Bearer token every path but /health requires."})
    n_parallel: int = field(default=8, metadata={"help": "Requests generated at once."})
    max_queue: int = field(default=64, metadata={"help": "Requests that may wait for a slot before 503s (0: none wait)."})
    max_body_mb: float = field(default=8.0, metadata={"help": "Largest request body in MiB; larger ones get 413."})
    allowed_hosts: list[str] = field(
        default_factory=list,
        metadata={"help": "Host header names accepted besides localhost, 127.0.0.1, ::1 and the bind address; * accepts any."},
    )

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if self.n_parallel < 1:
            raise ValueError(f"n_parallel must be at least 1, got {self.n_parallel}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be 0 (no waiting room) or more, got {self.max_queue}")
        if not (math.isfinite(self.max_body_mb) and self.max_body_mb > 0):
            raise ValueError(f"max_body_mb must be a positive number of MiB, got {self.max_body_mb}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (leave it out to serve without a key)")
        names = [name.strip() for entry in self.allowed_hosts for name in entry.split(",")]
        if any(not name for name in names):
            raise ValueError(f"allowed_hosts has an empty name: {','.join(self.allowed_hosts)!r}")
        self.allowed_hosts = names

    def accepted_hosts(self) -> list[str]:
        """Host header names the server answers: localhost names, the bind address (for a wildcard
        bind, this machine's name), and ``allowed_hosts``."""
        bind = [socket.gethostname()] if self.host in WILDCARD_BINDS else [self.host]
        names = [*LOCAL_HOSTS, *bind, *self.allowed_hosts]
        return list(dict.fromkeys(host_name(name) for name in names))

    def app_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~tandemlm.deploy.server.app.create_app`."""
        return {
            "api_key": self.api_key,
            "max_concurrency": self.n_parallel,
            "max_queue": self.max_queue,
            "max_body_bytes": int(self.max_body_mb * 2**20),
            "allowed_hosts": self.accepted_hosts(),
        }

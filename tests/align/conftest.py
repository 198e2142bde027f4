"""Fixtures for the align tests: the tiny Llama (SmolLM2's tokenizer and template), tiny-run settings,
and one reward run shared by the tests that need a reward model."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# Nothing here may reach a hub: TRL's telemetry ping and any download attempt stay off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Small and fast: a couple of optimizer steps on short rows, one torch thread (the suite shares 2 cores).
TINY: dict[str, Any] = {
    "max_steps": 2,
    "batch_size": 2,
    "max_length": 64,
    "threads": 1,
    "save_steps": 50,
    "logging_steps": 1,
    "learning_rate": 1e-3,
    "lr_scheduler": "constant",
}


def tiny_config(method: str, model: Path, output_dir: Path, **overrides: Any) -> Any:
    """A config for ``method`` on the tiny model with :data:`TINY` settings plus ``overrides``."""
    from tandemlm.align.config import build_config
    from tandemlm.align.registry import get_method

    values = {**TINY, "model": str(model), "output_dir": str(output_dir), **overrides}
    return build_config(get_method(method).config_cls, overrides=values)


def train_tiny(method: str, model: Path, output_dir: Path, **overrides: Any) -> Any:
    """Runs ``method`` on the tiny model; returns the Run."""
    from tandemlm.align.registry import run_method

    return run_method(method, tiny_config(method, model, output_dir, **overrides))


def state_dict_of(folder: Path) -> dict[str, Any]:
    """Tensors of a saved safetensors folder (model or adapter)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def changed_tensors(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Names present in both whose values differ."""
    import torch

    return [k for k in before if k in after and not torch.equal(before[k].float(), after[k].float())]


def chat_once(folder: Path, backend: str = "transformers") -> str:
    """One short greedy reply from ``folder`` (an HF folder, or a GGUF with ``backend="llama.cpp"``) through the deploy engines."""
    from tandemlm.deploy.engine import collect
    from tandemlm.deploy.registry import load_engine
    from tandemlm.deploy.types import SamplingParams

    engine = load_engine(str(folder), backend=backend)
    try:
        reply = collect(engine.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=5, temperature=0)))
    finally:
        engine.close()
    assert reply.usage.completion_tokens > 0
    return reply.text


def one_batch(ref: str, rows: int, folder: Path) -> str:
    """The first ``rows`` rows of ``ref`` as a JSONL file: with ``batch_size == rows`` every step sees the same
    batch, so the logged loss of the last step against the first shows whether training moved the model."""
    import json

    from tandemlm.align.data import read_rows, resolve_data_path

    path = folder / f"{ref.replace(':', '_')}-{rows}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in read_rows(resolve_data_path(ref))[:rows]))
    return str(path)


def metric_values(run: Any, key: str) -> list[float]:
    from tandemlm.align.metrics import read_metrics

    return [r[key] for r in read_metrics(run.metrics) if key in r]


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    from tandemlm.testing.tiny_models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def reward_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny LoRA reward model trained once for the session (reward, grpo and eval tests read it)."""
    out = tmp_path_factory.mktemp("reward")
    data = one_batch("builtin:prefs_train", 2, out / "data")  # batch_size 2: both steps see these 2 pairs
    return train_tiny("reward", tiny_llama, out / "run", dataset=data, lora=True, lora_layers=1)


@pytest.fixture
def score_server() -> Iterator[Callable[[Callable[[int, list[str]], list[float]]], str]]:
    """Starts an HTTP scorer answering ``{"scores": score(call_number, responses)}``; yields a starter returning its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(score: Callable[[int, list[str]], list[float]]) -> str:
        calls = [0]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls[0] += 1
                answer = json.dumps({"scores": score(calls[0], body["responses"])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/score"

    yield start
    for server in servers:
        server.shutdown()


def kill_at_first_checkpoint(command: list[str], out: Path, env: dict[str, str], limit: float = 300) -> int:
    """Starts ``command`` (a training run writing to ``out``), kill -9s it once a complete checkpoint exists;
    returns that checkpoint's step."""
    import signal
    import subprocess
    import time

    from tandemlm.align.run_folder import complete_checkpoints

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + limit
    try:
        while not complete_checkpoints(out / "checkpoints") if (out / "checkpoints").is_dir() else True:
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return int(complete_checkpoints(out / "checkpoints")[-1].name.split("-")[1])

"""One llama.cpp request as the scheduler thread sees it: prompt, progress, sampler, KV-cache bookkeeping."""

from __future__ import annotations

import codecs
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from tandemlm.deploy.constraints import Matcher
from tandemlm.deploy.llamacpp_sampling import RequestSampler
from tandemlm.deploy.ngram_draft import NgramDrafter
from tandemlm.deploy.types import GeneratedToken, SamplingParams


@dataclass
class LlamaRequest:
    """One generation (or scoring) job owned by the scheduler thread once admitted."""

    prompt: list[int]
    params: SamplingParams | None  # None: a scoring job
    adapter: str | None = None  # the LoRA adapter it decodes with (None: the base)
    out: queue.Queue[Any] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq_id: int = -1
    n_past: int = 0  # prompt tokens already decoded
    generated: list[int] = field(default_factory=list)
    matcher: Matcher | None = None  # a constrained request's grammar, built before it queues
    sampler: RequestSampler | None = None
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    score_targets: list[int] = field(default_factory=list)
    score_top: int = 0  # alternatives a scoring job lists at each target
    scores: list[GeneratedToken] = field(default_factory=list)
    drafter: NgramDrafter | None = None  # --speculative ngram: its tokens' n-gram index, built on first use

    @property
    def reserved(self) -> int:
        extra = self.params.max_tokens if self.params else 0
        return len(self.prompt) + extra

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    @property
    def n_generated(self) -> int:
        return len(self.generated)

    @property
    def max_reuse(self) -> int:
        """Most prompt tokens a cached prefix may cover: one must be decoded to get logits."""
        if self.params is None:  # scoring needs logits from the position before the first target
            return len(self.prompt) - len(self.score_targets) - 1
        return len(self.prompt) - 1

    def kv_tokens(self) -> list[int]:
        """The tokens whose keys and values are in this sequence's cache right now."""
        if self.prefilling or not self.generated:
            return self.prompt[: self.n_past]
        # The last sampled token is never decoded.
        return self.prompt + self.generated[:-1]

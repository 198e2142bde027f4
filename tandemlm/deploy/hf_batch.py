"""The running batch of the transformers backend: rows that decode together over one shared KV cache.

Continuous batching: rows join and leave a :class:`Batch` between decode steps. A new row is
prefilled in a batch of its own, then joined: the side whose cache is shorter is left-padded
(zero keys and values, attention mask 0) so both line up at the right, the end where tokens are
appended. A row that finishes or is cancelled is dropped at once with its KV rows, and cache
columns no remaining row attends to are cut. Position ids come from the attention mask, so
padding never moves a row's positions: a row gives the same tokens alone or in any batch.

transformers' own continuous-batching manager (``generate_batch``/``init_continuous_batching``,
paged attention) is not used: it samples every request with one shared logits-processor list
(temperature, top-k, top-p), so per-row grammars, seeded generators, penalties and log-probs
(``hf_sampling.RowSampler``) and PEFT's per-row adapters would not fit.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tandemlm.deploy.types import SamplingParams


@dataclass
class Row:
    """One request: its prompt and sampling settings, what it generated, and the queue its caller drains."""

    prompt: list[int]
    params: SamplingParams
    out: queue.Queue[Any] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    emitted_text: str = ""
    done: bool = False
    grammar: Any = None  # hf_sampling.GrammarMask for a constrained request, built before it queues
    id: int = 0  # submission number, for the engine's step log

    def finish(self, error: Exception | None = None) -> None:
        """Ends the caller's stream once: normally (``None`` on the queue) or with ``error``."""
        if not self.done:
            self.done = True
            self.out.put(error)


class Batch:
    """Rows decoding together: their KV cache, attention mask, samplers and the token each feeds next.

    Between steps the cache holds ``mask.shape[1]`` positions for every row (mask 0 on padding);
    ``next_ids`` are the tokens sampled last, not yet in the cache.
    """

    def __init__(self, rows: list[Row], samplers: list[Any], cache: Any, mask: torch.Tensor, next_ids: list[int]):
        self.rows, self.samplers, self.cache, self.mask = rows, samplers, cache, mask
        self.next_ids = next_ids

    @classmethod
    def prompts(cls, rows: list[Row], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' prompts left-padded to one width: input ids and attention mask."""
        width = max(len(r.prompt) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        return input_ids.to(device), mask.to(device)

    @staticmethod
    def new_cache(config: Any) -> Any:
        """An empty cache laid out for ``config`` (sliding-window or hybrid layers where the model has them)."""
        return DynamicCache(config=config)

    @property
    def adapters(self) -> list[str | None]:
        return [r.params.adapter for r in self.rows]

    @property
    def mergeable(self) -> bool:
        """Whether rows may join and leave: only when every layer is a plain full-attention ``DynamicLayer``.

        A sliding-window layer keeps a rolling window with its own length bookkeeping, and linear-attention,
        quantized or offloaded layers hold state that is not one ``[batch, heads, seq, dim]`` tensor, so
        padding or cutting them is not safe. Such models keep static batches: the batch runs until its
        last row ends, finished rows feed padding, and new rows wait for the next batch.
        """
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    def step_inputs(self) -> dict[str, Any]:
        """The keyword arguments of the next decode forward pass; extends the mask by the fed tokens."""
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        input_ids = torch.tensor(self.next_ids, device=self.mask.device)[:, None]
        return {
            "input_ids": input_ids,
            "attention_mask": self.mask,
            "position_ids": positions,
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def keep(self, indices: list[int]) -> None:
        """Keeps only the rows at ``indices`` (cache rows included), then cuts the padding they all share."""
        if len(indices) == len(self.rows):
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in indices]
        self.samplers = [self.samplers[i] for i in indices]
        self.next_ids = [self.next_ids[i] for i in indices]
        # A long prompt that left may have been the only reason for the left padding: drop columns no row attends to.
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]

    def join(self, other: Batch) -> None:
        """Appends ``other``'s rows; the shorter side is left-padded so every row's last position lines up."""
        grow = other.mask.shape[1] - self.mask.shape[1]
        mine, theirs = (grow, 0) if grow > 0 else (0, -grow)
        self.mask = torch.cat([_pad_left(self.mask, mine), _pad_left(other.mask, theirs)], dim=0)
        for layer, new in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, mine, -2), _pad_left(new.keys, theirs, -2)], dim=0)
            layer.values = torch.cat([_pad_left(layer.values, mine, -2), _pad_left(new.values, theirs, -2)], dim=0)
        self.rows += other.rows
        self.samplers += other.samplers
        self.next_ids += other.next_ids


def _pad_left(tensor: torch.Tensor, width: int, dim: int = -1) -> torch.Tensor:
    """``tensor`` with ``width`` zeros before its first entry along ``dim``."""
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

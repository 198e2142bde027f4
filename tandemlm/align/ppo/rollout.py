"""Rollouts: one batched, KV-cached sampling pass, then the no-grad scoring passes PPO needs.

A rollout row is ``[left-padded prompt | response, right-padded]``. The response runs through
its first end-of-sequence token; later positions are padding (``response_mask`` 0). The sampler's
own log-probs of the chosen tokens are kept, so the trainer can check that its forward pass sees
the same distribution the sampler drew from (a stale or broken weight sync cannot go unnoticed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tandemlm.align.sampling import Conversation, eos_ids, render_prompts


@dataclass
class Rollout:
    """The tensors of one rollout batch (``B`` rows, ``T`` response positions)."""

    rows: list[dict[str, Any]]
    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    response_mask: torch.Tensor  # [B, T] float, 1 on real response tokens (through EOS)
    ended: torch.Tensor  # [B] bool: the response stopped on EOS (not at the length limit)
    texts: list[str]
    sampler_logprobs: torch.Tensor  # [B, T] from the sampler's own logits
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # filled by the trainer

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, index: list[int]) -> Rollout:
        """A rollout of rows ``index`` only (sampling-time fields; extras are filled later)."""
        picked = torch.tensor(index, dtype=torch.long)
        return Rollout(
            rows=[self.rows[i] for i in index], input_ids=self.input_ids[picked], attention_mask=self.attention_mask[picked],
            response_mask=self.response_mask[picked], ended=self.ended[picked], texts=[self.texts[i] for i in index],
            sampler_logprobs=self.sampler_logprobs[picked],
        )

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of rows ``index`` (input ids, masks and every extra), for a minibatch."""
        picked = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                  "response_mask": self.response_mask[index]}
        picked.update({k: v[index] for k, v in self.extras.items() if v.dim() and v.shape[0] == len(self)})
        return picked


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different prompt and response widths as one: prompts left-padded, responses right-padded."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.input_ids.shape[1] - p.response_len for p in parts)
    response_width = max(p.response_len for p in parts)

    def padded(part: Rollout, ids: torch.Tensor, fill: int) -> torch.Tensor:
        prompt, response = ids[:, : ids.shape[1] - part.response_len], ids[:, ids.shape[1] - part.response_len :]
        left = prompt.new_full((len(part), prompt_width - prompt.shape[1]), fill)
        right = response.new_full((len(part), response_width - response.shape[1]), fill)
        return torch.cat([left, prompt, response, right], dim=1)

    def right(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((t.shape[0], response_width - t.shape[1]))], dim=1)

    return Rollout(
        rows=[r for p in parts for r in p.rows],
        input_ids=torch.cat([padded(p, p.input_ids, pad_id) for p in parts]),
        attention_mask=torch.cat([padded(p, p.attention_mask, 0) for p in parts]),
        response_mask=torch.cat([right(p.response_mask) for p in parts]),
        ended=torch.cat([p.ended for p in parts]), texts=[t for p in parts for t in p.texts],
        sampler_logprobs=torch.cat([right(p.sampler_logprobs) for p in parts]),
    )


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Conversation]) -> list[list[int]]:
    """Each prompt through the chat template (generation prompt added) as token ids."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in render_prompts(tokenizer, prompts)]


def left_pad(rows: Sequence[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows left-padded to the longest: (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def response_mask_from(tokens: torch.Tensor, stops: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask through the first stop token of each row, whether the row stopped) for [B, T] sampled tokens."""
    is_stop = torch.isin(tokens, torch.tensor(stops, device=tokens.device))
    seen_before = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # a stop strictly earlier in the row
    return (~seen_before).float(), is_stop.any(-1)


class ChosenLogprobs:
    """A logits processor that records each sampled token's log-prob under the raw logits / temperature.

    Custom processors run before generate's temperature and top-k warpers, so it sees the model's
    own logits. It keeps one step's log-softmax at a time and reads the chosen token at the next
    call (``output_logits`` would hold every step's [rows, vocab] logits: gigabytes for long replies).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(-1, tokens[:, None])[:, 0])

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probs once generation returned ``sequences`` (its last column is the last choice)."""
        self._take(sequences[:, -1])
        self.previous = None
        return torch.stack(self.chosen, dim=1)


@torch.no_grad()
def sample(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], prompt_ids: list[list[int]], max_new_tokens: int,
    temperature: float, top_k: int, synced: bool = False,
) -> Rollout:
    """Samples one response per prompt with ``model.generate`` (batched, left-padded, KV cache).

    ``synced`` (ZeRO-3): a process whose rows all ended keeps running forward passes until every
    process is done, since each forward gathers the sharded weights with the others."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stops = eos_ids(model, tokenizer)
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k or None, top_p=1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
    )
    recorder = ChosenLogprobs(temperature)
    sequences = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=[recorder], synced_gpus=synced,
    )
    tokens = sequences[:, ids.shape[1] :]
    sampler_logprobs = recorder.finish(sequences)
    response_mask, ended = response_mask_from(tokens, stops)
    tokens = torch.where(response_mask.bool(), tokens, torch.full_like(tokens, tokenizer.pad_token_id))
    sampler_logprobs = sampler_logprobs * response_mask
    texts = [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(tokens, response_mask, strict=True)]
    return Rollout(
        rows=rows, input_ids=torch.cat([ids, tokens], dim=1), attention_mask=torch.cat([mask, response_mask.long()], dim=1),
        response_mask=response_mask, ended=ended, texts=texts, sampler_logprobs=sampler_logprobs,
    )


class Sampler:
    """Where rollouts come from. ``sync`` is called after every update with the trained weights.

    The transformers sampler samples with the very module being trained, so there is nothing to
    push; a separate engine (``vllm_rollout.VLLMSampler``) must load the new actor adapter there.
    ``same_weights`` says the sampler's log-probs are the trainer's own (only their arithmetic path
    differs), so the trainer may take them as the rollout's old log-probs after checking them once.
    """

    same_weights = False

    def sync(self, ac: Any, step: int) -> None:
        """Makes the sampler run the actor's current weights."""

    def __call__(self, ac: Any, rows: list[dict[str, Any]], prompt_ids: list[list[int]]) -> Rollout:
        raise NotImplementedError

    def close(self) -> None:
        """Frees the sampler's resources."""


class TransformersSampler(Sampler):
    """``model.generate`` on the actor itself (adapter on), batched with a KV cache."""

    same_weights = True

    def __init__(self, tokenizer: Any, max_new_tokens: int, temperature: float, top_k: int, synced: bool = False) -> None:
        self.tokenizer, self.max_new_tokens, self.temperature, self.top_k = tokenizer, max_new_tokens, temperature, top_k
        self.synced = synced

    def __call__(self, ac: Any, rows: list[dict[str, Any]], prompt_ids: list[list[int]]) -> Rollout:
        with ac.actor() as model:
            model.eval()
            return sample(
                model, self.tokenizer, rows, prompt_ids, self.max_new_tokens, self.temperature, self.top_k, self.synced,
            )

"""Batched sampling and log-probabilities of chat responses with a transformers model.

Shared by ``tandem align eval`` and the PPO trainer: prompts are conversations rendered with the
tokenizer's chat template; responses are cut at the first end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tandemlm.models.stops import stop_ids

Conversation = list[dict[str, str]]
Progress = Callable[[int], None] | None  # called with the rows each batch finished


@dataclass
class Sample:
    """One sampled response: its text and token ids (through the first EOS, no padding)."""

    text: str
    token_ids: list[int]


def render_prompts(tokenizer: Any, prompts: Sequence[Conversation]) -> list[str]:
    """Each prompt through the chat template, ending where the assistant's reply starts."""
    return [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts]


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a reply (the generation config may list several)."""
    return sorted(stop_ids(tokenizer, model.generation_config))


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[Conversation], max_new_tokens: int, temperature: float,
    seed: int | None = None, batch_size: int = 16, progress: Progress = None,
) -> list[Sample]:
    """Samples one response per prompt (greedy when ``temperature`` is 0), batched and left-padded.

    Sampling uses the full distribution (no top-k/top-p), so log-probabilities of the samples
    estimate KL to another model without bias at temperature 1.
    """
    import torch
    from transformers import GenerationConfig

    if seed is not None:
        torch.manual_seed(seed)  # same stream for policy and reference: less noise in their difference
    stops = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None, top_p=1.0 if temperature > 0 else None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
    )
    device = next(model.parameters()).device
    samples: list[Sample] = []
    texts = render_prompts(tokenizer, prompts)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(device)
        with torch.inference_mode():
            out = model.generate(**batch, generation_config=config)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            ids = _cut_at_eos(row, stops)
            samples.append(Sample(tokenizer.decode(ids, skip_special_tokens=True), ids))
        if progress:
            progress(len(out))
    return samples


def _cut_at_eos(ids: list[int], stops: list[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in stops:
            return ids[: index + 1]
    return ids


def response_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[Conversation], responses: Sequence[list[int]], batch_size: int = 16,
    progress: Progress = None,
) -> list[list[float]]:
    """Per-token log-probabilities (temperature 1) of each response's token ids after its prompt."""
    import torch

    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(tokenizer, prompts)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    result: list[list[float]] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + list(r) for p, r in zip(prompt_ids[start : start + batch_size], responses[start : start + batch_size], strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for i, (p, r) in enumerate(zip(prompt_ids[start : start + batch_size], responses[start : start + batch_size], strict=True)):
            result.append(logps[i, len(p) - 1 : len(p) - 1 + len(r)].tolist())
        if progress:
            progress(len(rows))
    return result


def conversation_logprob(
    model: Any, tokenizer: Any, prompts: Sequence[Conversation], replies: Sequence[Conversation], progress: Progress = None
) -> list[float]:
    """Summed log-probability of each written reply (a conversation, e.g. DPO's chosen) after its prompt."""
    ids = []
    for prompt, reply in zip(prompts, replies, strict=True):
        prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(list(prompt) + list(reply), tokenize=False)
        prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer(full_text, add_special_tokens=False)["input_ids"][prompt_len:])
    return [sum(row) for row in response_logprobs(model, tokenizer, prompts, ids, progress=progress)]

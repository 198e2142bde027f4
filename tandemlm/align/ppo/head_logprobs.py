"""Token log-probs and entropy straight from the last hidden states, one row chunk of logits at a time.

The output layer's [tokens, vocab] logits are the largest tensors of an RL step on small and mid-size
models (SmolLM2: 49k vocab against a 576-wide hidden state; Qwen2: 152k). Computed the plain way,
autograd keeps the logits, the temperature-scaled copy and the log-sum-exp input for backward, and
backward makes as many gradients of the same size, while the entropy (logged) makes two more. Here
no [tokens, vocab] tensor exists at all: forward keeps each row's log-sum-exp and entropy, and backward
recomputes one chunk of logits at a time (one more head matmul: the same trade as Liger-Kernel's fused
linear cross-entropy, which cannot serve here because an RL loss's gradient per token is not known in
forward). Measured on the built-in model: the update's peak RSS fell by about 250 MB (bench/grpo_step.py).

Used by ``policy.ActorCritic.logprobs`` whenever the model's head is a plain ``nn.Linear`` whose output is
the logits unchanged (no soft-capping or logit scaling, the head not sharded by ZeRO-3, no adapter on it);
any other head goes through the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tandemlm.align.ppo.model_shapes import head_chunk_rows, transforms_logits


def plain_head(model: Any) -> nn.Linear | None:
    """The model's output layer when its output is the logits as they are, else None (use the full forward)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.numel() == 0 or hasattr(head.weight, "ds_id"):
        return None
    if transforms_logits(getattr(model, "config", None)):
        return None
    return head


def _head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits in the head's dtype."""
    return torch.nn.functional.linear(hidden, weight, bias)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature (no copy for fp32 logits at temperature 1)."""
    scaled = logits.float()
    return scaled if temperature == 1.0 else scaled / temperature


def _probs(scaled: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """softmax from the kept log-sum-exp, in one new tensor."""
    return torch.sub(scaled, lse[:, None]).exp_()


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without an [rows, vocab] product tensor."""
    return (a[:, None, :] @ b[:, :, None])[:, 0, 0]


class _HeadLogprobs(torch.autograd.Function):
    """(log p(target), entropy) per row of ``hidden`` under softmax(head(hidden) / temperature).

    Keeps no logits for backward (it recomputes each chunk's: one more head matmul, the memory of one chunk
    instead of the whole [rows, vocab]) and at most three chunk-sized temporaries at a time.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, chunk: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an output nothing used (a detached entropy) gets no gradient work
        rows = hidden.shape[0]
        chosen = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse, entropy = torch.empty_like(chosen), torch.full_like(chosen, float("nan"))
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            scaled = _scaled(_head(hidden[part], weight, bias), temperature)
            lse[part] = torch.logsumexp(scaled, dim=-1)
            chosen[part] = scaled.gather(-1, targets[part, None])[:, 0] - lse[part]
            if with_entropy:
                entropy[part] = lse[part] - _rowdot(_probs(scaled, lse[part]), scaled)  # H = lse - E_p[z]
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        return chosen, entropy

    @staticmethod
    def backward(ctx: Any, grad_chosen: torch.Tensor | None, grad_entropy: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            scaled = _scaled(_head(hidden[part], weight, bias), ctx.temperature)
            probs = _probs(scaled, lse[part])
            if grad_entropy is not None:  # dH/dz_j = -p_j (z_j - E_p[z]), E_p[z] = lse - H
                mean = (lse[part] - entropy[part])[:, None]
                grad = torch.sub(scaled, mean).mul_(probs).mul_(-grad_entropy[part].float()[:, None])
            else:
                grad = torch.zeros_like(probs)
            if grad_chosen is not None:  # d log p_t / dz = onehot(t) - p
                g = grad_chosen[part].float()[:, None]
                grad.sub_(probs.mul_(g)).scatter_add_(-1, targets[part, None], g)
            del probs
            grad_logits = grad.div_(ctx.temperature).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.float().T @ hidden[part].float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None,
        )


def head_logprobs(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, temperature: float, with_entropy: bool = False,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[..., hidden] states and [...] target ids -> ([...] log p(target), [...] entropy or None), both fp32.

    The same numbers as ``log_softmax(head(hidden).float() / temperature)`` gathered at the targets, with
    gradients to ``hidden`` and to the head's weight and bias when they require them (and through the
    entropy too, unless the caller detaches it). ``chunk_rows`` defaults to ``model_shapes.head_chunk_rows``.
    """
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_rows or head_chunk_rows(head.weight.shape[0], hidden.is_cuda)
    chosen, entropy = _HeadLogprobs.apply(
        flat_hidden, head.weight, head.bias, targets.reshape(-1), temperature, chunk, with_entropy,
    )
    return chosen.view(shape), entropy.view(shape) if with_entropy else None

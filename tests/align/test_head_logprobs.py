"""Log-probs from the hidden states, chunk by chunk: the same values and gradients as the plain log-softmax."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from tandemlm.align.ppo import policy
from tandemlm.align.ppo.head_logprobs import head_logprobs, plain_head


def _plain(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_plain_log_softmax(bias: bool) -> None:
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=bias)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    up_chosen, up_entropy = torch.randn(3, 5), torch.randn(3, 5)  # upstream gradients of both outputs
    grads = []
    for fn in (lambda: _plain(hidden, head, targets, 0.7),
               lambda: head_logprobs(hidden, head, targets, 0.7, with_entropy=True, chunk_rows=4)):
        hidden.grad, head.weight.grad = None, None
        if bias:
            head.bias.grad = None
        chosen, entropy = fn()
        ((chosen * up_chosen).sum() + (entropy * up_entropy).sum()).backward()
        grads.append((chosen.detach(), entropy.detach(), hidden.grad, head.weight.grad, head.bias.grad if bias else None))
    (c0, e0, h0, w0, b0), (c1, e1, h1, w1, b1) = grads
    assert torch.allclose(c0, c1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert torch.allclose(h0, h1, atol=1e-5) and torch.allclose(w0, w1, atol=1e-5)
    if bias:
        assert torch.allclose(b0, b1, atol=1e-5)


def test_without_entropy_only_log_probs_carry_a_gradient() -> None:
    torch.manual_seed(1)
    head = nn.Linear(6, 40, bias=False).requires_grad_(False)  # a frozen (LoRA) head: no weight gradient made
    hidden = torch.randn(7, 6, requires_grad=True)
    targets = torch.randint(0, 40, (7,))
    chosen, entropy = head_logprobs(hidden, head, targets, 1.0, chunk_rows=2)
    assert entropy is None and head.weight.grad is None
    chosen.sum().backward()
    expected = hidden.detach().clone().requires_grad_(True)
    _plain(expected, head, targets, 1.0)[0].sum().backward()
    assert torch.allclose(hidden.grad, expected.grad, atol=1e-5) and head.weight.grad is None


def test_a_head_that_changes_the_logits_takes_the_models_forward() -> None:
    class Model(nn.Module):
        def __init__(self, **config: object) -> None:
            super().__init__()
            self.config = type("Config", (), config)()
            self.lm_head = nn.Linear(4, 10)

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    assert plain_head(Model()) is not None
    assert plain_head(Model(final_logit_softcapping=30.0)) is None  # Gemma 2
    assert plain_head(Model(logit_scale=0.0625)) is None  # Cohere
    assert plain_head(Model(logits_scaling=1.0)) is not None  # Granite's default leaves the logits as they are
    adapted = Model()
    adapted.lm_head = nn.Sequential(nn.Linear(4, 10))  # e.g. an adapter wrapping the head
    assert plain_head(adapted) is None


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_policy_log_probs_entropy_and_adapter_gradients_match_the_full_forward(arch, tmp_path, monkeypatch) -> None:
    """ActorCritic.logprobs on a left-padded batch: the chunked head path against the model's own forward."""
    from tandemlm.align.model import load_tokenizer
    from tandemlm.align.ppo.method import build_actor_critic
    from tandemlm.align.ppo.rollout import left_pad, tokenize_prompts
    from tandemlm.testing.tiny_models import tiny_model

    folder = tiny_model(arch)
    config = tiny_config("grpo", folder, tmp_path / "run", dataset="builtin:capitals_train", lora=True, lora_layers=1,
                         batch_size=4, num_generations=2, minibatch_size=4)
    config.gradient_checkpointing, config.bf16 = False, False
    ac = build_actor_critic(config, folder)
    with torch.no_grad():
        for name, param in ac.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    tokenizer = load_tokenizer(folder)
    prompts = [[{"role": "user", "content": text}] for text in ("What is the capital of Peru?", "Hi")]
    ids, mask = left_pad(tokenize_prompts(tokenizer, prompts), tokenizer.pad_token_id, "cpu")
    prefix = ac.prefix(ids, mask)
    results = []
    for chunked in (True, False):
        if not chunked:
            monkeypatch.setattr(policy, "plain_head", lambda model: None)
        with ac.actor() as model:
            assert (policy.plain_head(model) is not None) == chunked
            ac.model.zero_grad(set_to_none=True)
            chosen, entropy = ac.logprobs(model, ids, mask, 5, 0.8, with_entropy=True, entropy_grad=True, prefix=prefix)
            (chosen.sum() + 0.5 * entropy.sum()).backward()
            grads = {n: p.grad.clone() for n, p in ac.model.named_parameters() if p.grad is not None}
        results.append((chosen.detach(), entropy.detach(), grads))
    (c0, e0, g0), (c1, e1, g1) = results
    assert torch.allclose(c0, c1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5, rtol=1e-4), name

"""The four PPO roles on one resident base model.

- actor: a LoRA adapter (``policy``) on the base;
- critic: a second LoRA adapter (``critic``) on the same base plus :class:`ValueHead`, a scalar per token;
- reference: the same base with every adapter disabled;
- reward model (optional): a third, frozen adapter (``reward``) with the reward run's score head,
  when the reward run is a LoRA run on the same base (see scoring.py).

Only one copy of the base weights is ever in memory. A full fine-tune (``lora: false``) keeps a
trainable actor, a separate trainable critic backbone and a frozen reference copy instead. Under
DeepSpeed ZeRO the critic's adapter sits on a copy of the base of its own (``separate_critic``):
an engine owns one module and one optimizer, and actor and critic step separately (``optim.py``).

When the adapters sit only on the top layers (``lora_layers``), the layers below are the same for
every role and never change: :meth:`ActorCritic.prefix` runs them once per rollout, and every later
pass (actor, reference, critic, each PPO epoch) starts from those hidden states. On the CPU demo
(adapters on 8 of 30 layers) that makes each pass about a third of a full forward.
Every forward pass takes ``position_ids`` from the attention mask, as ``generate`` does, so the
trainer's log-probs of a left-padded rollout equal the ones the sampler saw.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tandemlm.align.ppo.head_logprobs import head_logprobs, plain_head
from tandemlm.align.ppo.maths import entropy_from_logits

POLICY, CRITIC, REWARD = "policy", "critic", "reward"


class _PrefixDone(Exception):
    """Raised by a pre-hook to stop a forward once the frozen prefix has run."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class ValueHead(nn.Module):
    """hidden state -> scalar value, in fp32 whatever the base's dtype (values feed GAE sums)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)  # a cold critic predicts 0 rather than noise
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (what ``generate`` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder(model: Any) -> nn.Module:
    """The decoder stack of a causal LM, under a peft wrapper or not."""
    return backbone(model.get_base_model() if hasattr(model, "get_base_model") else model)


def backbone(model: Any) -> nn.Module:
    """The decoder stack under a causal-LM head (``model.model`` for Llama/Qwen2/DeepSeek)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)


class ActorCritic:
    """Actor, critic and reference over one base; switch roles with :meth:`actor`, :meth:`critic`, :meth:`reference`."""

    def __init__(
        self, model: Any, actor_lora: Any, critic_lora: Any, hidden_size: int, separate_critic: bool = False,
        skip_prefix: bool = False, with_critic: bool = True,
    ) -> None:
        """``model`` is the causal LM; ``*_lora`` are peft ``LoraConfig`` (both None: full fine-tune).

        ``separate_critic`` puts the critic adapter on a copy of the base (DeepSpeed needs one module per
        optimizer: ``optim.EngineStep``); ``skip_prefix`` runs every pass from the tokens (ZeRO-3 gathers
        weights layer by layer in forward hooks, which a forward stopped half-way would leave gathered).
        ``with_critic=False`` (the critic-free algorithms) builds the actor and the reference only.
        """
        self.lora = actor_lora is not None
        self.has_critic = with_critic
        self.critic_model: Any = None
        self.value_head: ValueHead | None = None
        if self.lora:
            from peft import get_peft_model

            critic_base = copy.deepcopy(model) if separate_critic and with_critic else None
            self.model = get_peft_model(model, actor_lora, adapter_name=POLICY)
            if critic_base is not None:  # adapters drawn in the same order as below: the same initial weights
                self.critic_model = get_peft_model(critic_base, critic_lora, adapter_name=CRITIC)
            elif with_critic:
                self.model.add_adapter(CRITIC, critic_lora)
                self.critic_model = self.model
            self.model.set_adapter(POLICY)
            self.reference_model = None
        else:
            self.model = model
            self.critic_model = copy.deepcopy(backbone(model)) if with_critic else None
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        if with_critic:
            self.value_head = ValueHead(hidden_size).to(next(model.parameters()).device)
        self.frozen_layers = 0 if skip_prefix else _first_adapted_layer(actor_lora, *([critic_lora] if with_critic else []))
        self.separate_critic = with_critic and self.critic_model is not self.model

    def critic_module(self) -> nn.Module:
        """Every module the critic trains (its adapter's model or backbone, and the value head), as one."""
        return nn.ModuleDict({"critic": self.critic_model, "value_head": self.value_head})

    # ---- the frozen prefix ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Hidden states entering the first adapted layer (None when every layer is adapted or trained)."""
        if not self.frozen_layers:
            return None
        decoder = backbone(self.model.get_base_model())

        def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _PrefixDone(args[0] if args else kwargs["hidden_states"])

        handle = decoder.layers[self.frozen_layers].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=False)
        except _PrefixDone as done:
            return done.hidden
        finally:
            handle.remove()
        raise RuntimeError("the frozen prefix never reached its last layer")

    @contextmanager
    def _suffix(self, prefix: torch.Tensor | None) -> Iterator[dict[str, Any]]:
        """Forward inputs that start at the first adapted layer when ``prefix`` is given (else from the tokens)."""
        if prefix is None:
            yield {}
            return
        decoder = backbone(self.model.get_base_model())
        layers = decoder.layers
        decoder.layers = nn.ModuleList(layers[self.frozen_layers :])
        try:
            yield {"inputs_embeds": prefix}
        finally:
            decoder.layers = layers

    # ---- parameters -------------------------------------------------------------------------------

    def actor_parameters(self) -> list[nn.Parameter]:
        if not self.lora:
            return list(self.model.parameters())
        return [p for n, p in self.model.named_parameters() if f".{POLICY}." in n]

    def critic_parameters(self) -> list[nn.Parameter]:
        if self.value_head is None:
            return []
        head = list(self.value_head.parameters())
        if not self.lora:
            return [*self.critic_model.parameters(), *head]
        return [*(p for n, p in self.critic_model.named_parameters() if f".{CRITIC}." in n), *head]

    def trained(self) -> list[tuple[str, nn.Parameter]]:
        """Every trained tensor by name: both adapters (or the full actor and critic) and the value head."""
        if not self.lora:
            named = [(f"actor.{n}", p) for n, p in self.model.named_parameters()]
        else:
            named = [(n, p) for n, p in self.model.named_parameters() if f".{POLICY}." in n]
        if self.value_head is None:
            return named
        named = [(f"value_head.{n}", p) for n, p in self.value_head.named_parameters()] + named
        if not self.lora:
            return named + [(f"critic.{n}", p) for n, p in self.critic_model.named_parameters()]
        return named + [(n, p) for n, p in self.critic_model.named_parameters() if f".{CRITIC}." in n]

    # ---- roles ------------------------------------------------------------------------------------

    @contextmanager
    def adapter(self, name: str) -> Iterator[Any]:
        """The peft model with adapter ``name`` active; the actor's adapter is active again afterwards."""
        self.model.set_adapter(name)
        try:
            yield self.model
        finally:
            self.model.set_adapter(POLICY)

    @contextmanager
    def actor(self) -> Iterator[Any]:
        """The policy model (causal LM) with the actor adapter active."""
        if self.lora:
            self.model.set_adapter(POLICY)
            self._trainable(self.actor_parameters())
        yield self.model

    @contextmanager
    def reference(self) -> Iterator[Any]:
        """The frozen reference: adapters disabled (LoRA) or the separate copy (full fine-tune)."""
        if self.reference_model is not None:
            yield self.reference_model
            return
        with self.model.disable_adapter():
            yield self.model

    @contextmanager
    def critic(self) -> Iterator[nn.Module]:
        """The critic's backbone (decoder stack) with the critic adapter active."""
        if not self.lora:
            yield self.critic_model
            return
        if self.separate_critic:
            yield backbone(self.critic_model.get_base_model())
            return
        with self.adapter(CRITIC):
            self._trainable(self.critic_parameters())
            yield backbone(self.model.get_base_model())

    @staticmethod
    def _trainable(params: list[nn.Parameter]) -> None:
        # peft's set_adapter freezes the inactive adapter; the active role's weights must train.
        for p in params:
            p.requires_grad_(True)

    # ---- forward passes ---------------------------------------------------------------------------

    def logprobs(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, temperature: float,
        with_entropy: bool = False, entropy_grad: bool = False, prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (at ``temperature``) of the last ``response_len`` tokens, and optionally the entropy there.

        The entropy carries a gradient only with ``entropy_grad`` (an entropy bonus); logged alone it costs
        no extra memory in backward.

        Only the response positions reach the output layer, and through ``head_logprobs`` one chunk of
        rows at a time: the [rows, tokens, vocab] logits are the peak of an RL step on small models. A head
        whose output is not the logits as they are (soft-capping, scaling, ZeRO-3 sharding, an adapter on
        it) runs the model's own forward with ``logits_to_keep`` instead.
        """
        targets = input_ids[:, -response_len:]
        head = plain_head(model)
        with self._suffix(prefix) as start:
            inputs = {**(start or {"input_ids": input_ids}), "attention_mask": attention_mask,
                      "position_ids": positions(attention_mask), "use_cache": False}
            if head is not None:
                hidden = _decoder(model)(**inputs).last_hidden_state[:, -response_len - 1 : -1]
            else:
                out = model(**inputs, logits_to_keep=response_len + 1)
        if head is not None:
            chosen, entropy = head_logprobs(hidden, head, targets, temperature, with_entropy=with_entropy)
            if entropy is not None and not entropy_grad:
                entropy = entropy.detach()
            return chosen, entropy
        logits = out.logits[:, :-1].float() / temperature
        # logit - logsumexp: no [rows, tokens, vocab] log-softmax tensor is kept for backward.
        chosen = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                entropy = entropy_from_logits(logits)
        return chosen, entropy

    def values(
        self, decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """V(s_t) for each response token: the value of the state that token was sampled in."""
        with self._suffix(prefix) as start:
            hidden = decoder(
                **(start or {"input_ids": input_ids}), attention_mask=attention_mask,
                position_ids=positions(attention_mask), use_cache=False,
            ).last_hidden_state
        return self.value_head(hidden[:, -response_len - 1 : -1])


def _first_adapted_layer(*loras: Any) -> int:
    """How many bottom layers no adapter touches (0 for a full fine-tune or adapters on every layer)."""
    firsts = []
    for lora in loras:
        layers = getattr(lora, "layers_to_transform", None) if lora is not None else None
        if not layers:
            return 0
        firsts.append(min([layers] if isinstance(layers, int) else layers))
    return min(firsts) if firsts else 0

"""The score of each rollout response: a weighted mix of reward sources (GRPO's reward spec).

Sources (``rewards: verifier:1,reward_model:0.5,http:1``):

- ``verifier``: the rule-based task checkers (rows carry ``task`` and ``answer``);
- ``reward_model``: a reward run (``tandem align reward``). A LoRA reward run on the PPO base is
  attached as a third, frozen adapter on the one resident base (:class:`SharedBaseRewardModel`);
  anything else loads as its own model;
- ``http``: an endpoint that scores pairs (``rewards.HttpReward``).

A row's score is the weighted sum over the sources that scored it; each source's mean is logged
as ``rewards/<name>/mean``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tandemlm.align.errors import ConfigError
from tandemlm.align.ppo.policy import REWARD, ActorCritic, backbone, positions
from tandemlm.align.rewards import HttpReward, parse_reward_spec, verifier
from tandemlm.align.run_folder import is_run_folder, read_run_folder
from tandemlm.align.sampling import Conversation

Source = Callable[[list[dict[str, Any]], list[str]], list[float | None]]


class RewardMix:
    """Scores responses with every source of a reward spec and sums them with their weights."""

    def __init__(self, sources: list[tuple[str, float, Source]]) -> None:
        self.sources = sources

    def __call__(self, rows: list[dict[str, Any]], texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """(scores [rows], mean score of each source) for ``texts`` answering ``rows``' prompts."""
        total = [0.0] * len(rows)
        means: dict[str, float] = {}
        for name, weight, source in self.sources:
            values = source(rows, texts)
            if len(values) != len(rows):
                raise ConfigError(f"rewards: {name} returned {len(values)} scores for {len(rows)} responses")
            scored = [v for v in values if v is not None]
            if any(not math.isfinite(v) for v in scored):
                raise ConfigError(f"rewards: {name} returned a non-finite score")
            means[f"rewards/{name}/mean"] = sum(scored) / len(scored) if scored else float("nan")
            total = [t + weight * v if v is not None else t for t, v in zip(total, values, strict=True)]
        return torch.tensor(total), means


def check_rows(rows: Sequence[dict[str, Any]], spec: str, source: str) -> None:
    """Fails naming the first row the verifier could not score (it needs ``task`` and ``answer``)."""
    if "verifier" not in {name for name, _ in parse_reward_spec(spec)}:
        return
    for number, row in enumerate(rows, 1):
        if row.get("task") is None or row.get("answer") is None:
            raise ConfigError(f"{source} row {number}: the verifier reward needs 'task' and 'answer' fields")


def build_reward_mix(config: Any, ac: ActorCritic, tokenizer: Any, base_folder: Path) -> RewardMix:
    """The sources of ``config.rewards`` in order, with their weights."""
    sources: list[tuple[str, float, Source]] = []
    for name, weight in parse_reward_spec(config.rewards):
        if name == "verifier":
            sources.append((name, weight, _verifier_source))
        elif name == "reward_model":
            sources.append((name, weight, reward_model_source(config.reward_model, ac, tokenizer, base_folder)))
        elif name == "http":
            sources.append((name, weight, _http_source(HttpReward(config.reward_url))))
        else:
            raise ConfigError(f"rewards: {name!r} is not available to ppo (use verifier, reward_model or http)")
    return RewardMix(sources)


def _verifier_source(rows: list[dict[str, Any]], texts: list[str]) -> list[float | None]:
    return verifier([], texts, task=[r.get("task") for r in rows], answer=[r.get("answer") for r in rows])


def _http_source(http: HttpReward) -> Source:
    return lambda rows, texts: http.score([row["prompt"] for row in rows], texts)


def _conversations(rows: list[dict[str, Any]], texts: list[str]) -> list[Conversation]:
    return [[*row["prompt"], {"role": "assistant", "content": text}] for row, text in zip(rows, texts, strict=True)]


# ---------------------------------------------------------------------------------------------
# Reward models


def reward_adapter(run_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """(LoRA config for a causal LM, LoRA weights, score-head weight [1, hidden]) of a LoRA reward run."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    run = read_run_folder(run_dir)
    lora = LoraConfig.from_pretrained(str(run.final))
    lora.task_type, lora.modules_to_save = "CAUSAL_LM", None  # the score head becomes our own module
    lora.inference_mode = False
    tensors = load_file(str(run.final / "adapter_model.safetensors"))
    weights = {k: v for k, v in tensors.items() if "lora_" in k}
    heads = [v for k, v in tensors.items() if k.endswith("score.weight")]
    if not heads:
        raise ConfigError(f"reward_model: {run.final} has no score head in its adapter")
    return lora, weights, heads[0]


def shares_base(run_dir: str | Path, base_folder: Path) -> bool:
    """Whether ``run_dir`` is a LoRA reward run trained on ``base_folder`` (so it can ride on our base)."""
    if not is_run_folder(run_dir):
        return False  # an HF folder: a reward model of its own
    run = read_run_folder(run_dir)
    if run.method != "reward":
        raise ConfigError(f"reward_model: {run.dir} is a {run.method} run, not a reward run")
    return run.is_adapter and run.final.is_dir() and run.base_model.resolve() == Path(base_folder).resolve()


class SharedBaseRewardModel:
    """A LoRA reward run as a frozen adapter on the PPO base: scores as the merged reward model would."""

    def __init__(self, run_dir: str | Path, ac: ActorCritic, tokenizer: Any) -> None:
        from peft import set_peft_model_state_dict

        lora, weights, head = reward_adapter(run_dir)
        self.ac, self.tokenizer = ac, tokenizer
        ac.model.add_adapter(REWARD, lora)
        set_peft_model_state_dict(ac.model, weights, adapter_name=REWARD)
        for name, param in ac.model.named_parameters():
            if f".{REWARD}." in name:
                param.requires_grad_(False)
        self.head = head.float().to(next(ac.model.parameters()).device)

    @torch.no_grad()
    def __call__(self, rows: list[dict[str, Any]], texts: list[str]) -> list[float | None]:
        tok = self.tokenizer
        chats = [tok.apply_chat_template(c, tokenize=False) for c in _conversations(rows, texts)]
        batch = tok(chats, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        batch = batch.to(self.head.device)
        with self.ac.adapter(REWARD):
            hidden = backbone(self.ac.model.get_base_model())(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=positions(batch["attention_mask"]), use_cache=False,
            ).last_hidden_state
        # The row's last non-pad token, by transformers' sequence-classification rule (pad ids, not the mask).
        non_pad = (batch["input_ids"] != tok.pad_token_id).int()
        last = (torch.arange(non_pad.shape[1], device=non_pad.device) * non_pad).argmax(-1)
        pooled = hidden[torch.arange(len(chats), device=hidden.device), last].float()
        return (pooled @ self.head.T)[:, 0].tolist()


class SeparateRewardModel:
    """A reward model in its own weights (a full fine-tune, or a run on another base)."""

    def __init__(self, ref: str | Path, dtype: Any, device: str = "cpu") -> None:
        from tandemlm.align.rewards import load_reward_model

        self.model, self.tokenizer = load_reward_model(ref, dtype, device)

    def __call__(self, rows: list[dict[str, Any]], texts: list[str]) -> list[float | None]:
        from tandemlm.align.rewards import score_conversations

        return list(score_conversations(self.model, self.tokenizer, _conversations(rows, texts)))


def reward_model_source(ref: str, ac: ActorCritic, tokenizer: Any, base_folder: Path) -> Source:
    """The cheapest way to score with reward run ``ref``: an adapter on our base when it can be one."""
    if ac.lora and shares_base(ref, base_folder):
        return SharedBaseRewardModel(ref, ac, tokenizer)
    weight = next(ac.model.parameters())
    return SeparateRewardModel(ref, weight.dtype, str(weight.device))

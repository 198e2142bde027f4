"""Reward functions for GRPO, PPO and eval: the rule-based verifier and a trained reward model.

``rewards`` in a GRPO (or PPO) config names them with weights, ``verifier:1,reward_model:0.5``;
TRL sums the weighted rewards per completion (``reward_weights``) and logs each one as
``rewards/<name>/mean``. Reward builders register by name (:func:`register_reward`, which a method
module may call to add its own); an unknown name lists the known ones. A builder gets the method's
config and reads the fields it needs (``reward_model``, ``bf16``, ...); nothing here knows a method.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tandemlm.align.errors import ConfigError
from tandemlm.align.model import inference_load_kwargs, load_tokenizer, quiet_transformers
from tandemlm.align.run_folder import is_run_folder, read_run_folder
from tandemlm.align.tasks import verify
from tandemlm.hardware import inference_precision
from tandemlm.storage.pickle_guard import refused_pickle

# name -> builder(config) -> (reward function or model, its tokenizer or None)
_REWARDS: dict[str, Callable[[Any], tuple[Any, Any]]] = {}


def register_reward(name: str) -> Callable[[Callable[..., tuple[Any, Any]]], Callable[..., tuple[Any, Any]]]:
    """Decorator for a reward builder."""

    def wrap(builder: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
        _REWARDS[name] = builder
        return builder

    return wrap


def reward_names() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REWARDS)


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``"verifier:1,reward_model:0.5"`` -> ``[("verifier", 1.0), ("reward_model", 0.5)]`` (weight defaults to 1)."""
    parsed = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        if name not in _REWARDS:
            raise ConfigError(f"rewards: unknown reward {name!r}; known rewards: {', '.join(sorted(_REWARDS))}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"rewards: weight of {name!r} must be a number, got {weight!r}") from None
        parsed.append((name, value))
    if not parsed:
        raise ConfigError("rewards must name at least one reward function (e.g. verifier)")
    return parsed


def build_rewards(config: Any) -> tuple[list[Any], list[float], list[Any]]:
    """(reward functions or models, weights, processing classes) in the order of ``config.rewards``.

    ``config`` is any method's config with a ``rewards`` spec and the fields its rewards read.
    """
    funcs, weights, tokenizers = [], [], []
    for name, weight in parse_reward_spec(config.rewards):
        func, tokenizer = _REWARDS[name](config)
        funcs.append(func)
        weights.append(weight)
        tokenizers.append(tokenizer)
    return funcs, weights, tokenizers


# ---------------------------------------------------------------------------------------------
# The verifier


def completion_text(completion: Any) -> str:
    """The text of a completion: a plain string, or the assistant messages of a conversational one."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role", "assistant") == "assistant")


def verifier(
    prompts: Sequence[Any], completions: Sequence[Any], task: Sequence[str | None] | None = None,
    answer: Sequence[str | None] | None = None, **_: Any,
) -> list[float | None]:
    """1.0 when the row's ``task`` checker accepts the completion, else 0.0; None for rows without a task."""
    tasks = task or [None] * len(completions)
    answers = answer or [None] * len(completions)
    return [
        None if t is None or a is None else float(verify(t, completion_text(c), a))
        for c, t, a in zip(completions, tasks, answers, strict=True)
    ]


@register_reward("verifier")
def _verifier_reward(config: Any) -> tuple[Any, Any]:
    return verifier, None


# ---------------------------------------------------------------------------------------------
# A trained reward model


@register_reward("reward_model")
def _reward_model_reward(config: Any) -> tuple[Any, Any]:
    if not config.reward_model:
        raise ConfigError("rewards uses reward_model but reward_model (a reward run folder) is not set")
    import torch

    model, tokenizer = load_reward_model(config.reward_model, torch.bfloat16 if config.bf16 else torch.float32)
    model.name_or_path = "reward_model"  # TRL names the metric after it: rewards/reward_model/mean
    model.config.name_or_path = "reward_model"
    return model, tokenizer


def check_reward_sources(config: Any) -> None:
    """One line unless ``config.rewards`` parses and each source it names has its setting.

    ``config`` has ``rewards``, ``reward_model`` and ``reward_url`` (every RL method's config does).
    """
    names = {name for name, _ in parse_reward_spec(config.rewards)}  # raises ConfigError naming `rewards`
    if "reward_model" in names and not config.reward_model:
        raise ConfigError("rewards uses reward_model but reward_model (a reward run folder) is not set")
    if "http" in names and not config.reward_url:
        raise ConfigError("rewards uses http but reward_url is not set")


def check_reward_model(ref: str | Path) -> None:
    """Fails with one line unless ``ref`` is a reward run folder or an HF model folder (reads no weights)."""
    path = Path(ref).expanduser()
    if is_run_folder(path):
        method = read_run_folder(path).method
        if method != "reward":
            raise ConfigError(f"reward_model: {path} is a {method} run, not a reward run")
    elif not (path / "config.json").is_file():
        raise ConfigError(f"reward_model: {path} is neither a reward run folder nor an HF model folder")


def load_reward_model(ref: str | Path, dtype: Any = None, device: str | None = None) -> tuple[Any, Any]:
    """A reward model (eval mode) and its tokenizer from a reward run or an HF folder.

    Without ``dtype`` it is placed for inference on this machine (``hardware.inference_precision``:
    cuda + bf16/fp16 on a GPU, fp32 on CPU; ``device`` "auto", "cpu" or "cuda"); with a ``dtype``
    (a trainer's) it loads on ``device`` or the CPU and the trainer places it. A LoRA reward run is
    loaded as base + adapter and merged in memory: scoring needs no adapter switching, and TRL
    treats it as a plain ``PreTrainedModel``. A QLoRA reward run scored on a GPU loads its base in
    4-bit again, as it trained, and keeps the adapter unmerged (bitsandbytes weights are not merged into).
    """
    from transformers import AutoModelForSequenceClassification

    precision = inference_precision(device or "auto") if dtype is None else None
    if precision is not None:
        dtype, device = precision.torch_dtype(), precision.device
    check_reward_model(ref)
    path = Path(ref).expanduser()
    run = read_run_folder(path) if is_run_folder(path) else None
    if run is not None and run.is_adapter and not run.merged.is_dir():
        four_bit = precision is not None and run.trained_in_4bit and precision.device.startswith("cuda")
        kwargs = inference_load_kwargs(precision, four_bit=True) if four_bit else {"dtype": dtype}  # type: ignore[arg-type]
        model, tokenizer = _adapter_reward_model(run, kwargs), load_tokenizer(run.final)
        if four_bit:
            model.config.pad_token_id = tokenizer.pad_token_id
            return model.eval(), tokenizer  # placed by bitsandbytes already: .to() is refused
        model = model.merge_and_unload()
    else:
        folder = run.model_folder() if run is not None else path
        with refused_pickle(folder):
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype)
        tokenizer = load_tokenizer(folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    return (model.to(device) if device else model).eval(), tokenizer


def _adapter_reward_model(run: Any, load_kwargs: dict[str, Any]) -> Any:
    """The run's base with a one-score head and its LoRA adapter on top (a PeftModel, not merged)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():  # the base has no score head yet; the adapter brings it, so no "MISSING" report
        base = AutoModelForSequenceClassification.from_pretrained(run.base_model, num_labels=1, **load_kwargs)
    return PeftModel.from_pretrained(base, run.final)


def score_conversations(
    model: Any, tokenizer: Any, conversations: Sequence[list[dict[str, str]]], batch_size: int = 16, progress: Any = None
) -> list[float]:
    """Reward-model scores of whole conversations, tokenized as TRL's RewardTrainer and GRPOTrainer do."""
    import torch

    scores: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False).to(device)
        with torch.inference_mode():
            scores.extend(model(**batch).logits[:, 0].float().tolist())
        if progress:
            progress(len(texts))
    return scores


# ---------------------------------------------------------------------------------------------
# A scoring endpoint of the user's


class HttpReward:
    """Scores through an HTTP endpoint: ``POST {"prompts": [[messages]], "responses": [text]}`` -> ``{"scores": [...]}``.

    A score may be null (the endpoint abstains). Any failure is one line naming the URL. Callable
    as a TRL reward function (GRPO) and through :meth:`score` (PPO).
    """

    __name__ = "http"  # TRL names the metric after it: rewards/http/mean

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url, self.timeout = url, timeout

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
        return self.score(list(prompts), [completion_text(c) for c in completions])

    def score(self, prompts: list[Any], responses: list[str]) -> list[float | None]:
        """The endpoint's scores of ``responses`` to ``prompts`` (conversations), one per response."""
        body = json.dumps({"prompts": prompts, "responses": responses}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                answer = json.loads(reply.read())
        except json.JSONDecodeError:
            raise ConfigError(f"reward_url {self.url}: the answer is not JSON") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ConfigError(f"reward_url {self.url}: request failed ({getattr(exc, 'reason', exc)})") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or not all(s is None or isinstance(s, (int, float)) for s in scores):
            raise ConfigError(f'reward_url {self.url}: expected {{"scores": [numbers]}}, got {str(answer)[:80]}')
        if len(scores) != len(responses):
            raise ConfigError(f"reward_url {self.url}: {len(scores)} scores for {len(responses)} responses")
        return [None if s is None else float(s) for s in scores]


@register_reward("http")
def _http_reward(config: Any) -> tuple[Any, Any]:
    if not getattr(config, "reward_url", None):
        raise ConfigError("rewards uses http but reward_url is not set")
    return HttpReward(config.reward_url), None

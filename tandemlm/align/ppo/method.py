"""``tandem align ppo|grpo|dapo|gspo|dcpo``: set-up, resume and final save around the RL trainer.

PPO runs :class:`~tandemlm.align.ppo.trainer.PPOTrainer` (actor and critic); the critic-free algorithms
run :class:`~tandemlm.align.ppo.group_trainer.GroupTrainer` (actor only) on the same machinery. Order
matters for a fast, clear failure: the config and data are checked and the prompts counted before any
weights load; ``--plan`` stops there. Then the run folder, the base (once), the adapters, the reward
mix, and the loop with checkpoints every ``save_steps``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from tandemlm.align.callbacks import HackingWatch, MetricsLogger, RichProgress
from tandemlm.align.data import load_rows
from tandemlm.align.errors import ConfigError
from tandemlm.align.metrics import append_jsonl, truncate_metrics
from tandemlm.align.model import base_folder, load_model, load_tokenizer, lora_config, set_threads
from tandemlm.align.ppo import checkpoint
from tandemlm.align.ppo.config import ZERO3_VLLM_REFUSAL, PPORunConfig, RLRunConfig
from tandemlm.align.ppo.group_trainer import GroupTrainer
from tandemlm.align.ppo.optim import load_weights_whole, zero_stage
from tandemlm.align.ppo.policy import CRITIC, POLICY, ActorCritic
from tandemlm.align.ppo.rl_trainer import Distributed, RLTrainer
from tandemlm.align.ppo.rollout import Sampler, TransformersSampler, tokenize_prompts
from tandemlm.align.ppo.scoring import build_reward_mix, check_rows, reward_adapter, shares_base
from tandemlm.align.ppo.trainer import PPOTrainer
from tandemlm.align.prepare import quiet_libraries
from tandemlm.align.run import Run, finish_run, prepare_run, record_session
from tandemlm.align.run_folder import latest_checkpoint
from tandemlm.models.builtin import BUILTIN_MODELS
from tandemlm.storage.atomic import replace_dir

SAMPLES_FILE = "samples.jsonl"  # a few prompts, responses and scores per logged step


def run_ppo(config: RLRunConfig) -> Run | None:
    """Trains ``config.model`` with its algorithm on the prompts of ``config.dataset``; ``plan`` only prints the memory plan."""
    if config.plan:
        print_plan(config)
        return None
    if config.rollout_backend == "vllm" and zero_stage() == 3:  # launched with zero3.yaml, not --distributed
        raise ConfigError(ZERO3_VLLM_REFUSAL)
    if zero_stage() == 3:
        load_weights_whole()  # the engines shard actor and critic; copies and the reward model stay whole
    quiet_libraries()
    rows, _, path = load_rows(config.dataset, "ppo", keep_extra=True)
    check_rows(rows, config.rewards, str(path))
    set_threads(config.threads)
    folder = base_folder(config.model, config.trust_remote_code)
    dist = Distributed()
    run = prepare_run(config, folder)
    c: RLRunConfig = run.config  # auto fields resolved
    if c.uses_lora and c.lora_dropout:
        raise ConfigError(f"lora_dropout: {c.method} trains with dropout off (it would make old and new log-probs differ); set 0")
    if c.rollout_backend == "vllm":
        from tandemlm.align.ppo.vllm_rollout import check_config


        check_config(c)  # refuse before any weights load
    tokenizer = load_tokenizer(folder, c.trust_remote_code)
    prompt_ids = tokenize_prompts(tokenizer, [r["prompt"] for r in rows])
    _check_prompt_lengths(prompt_ids, c, str(path))
    ac = build_actor_critic(c, folder)
    reward = build_reward_mix(c, ac, tokenizer, folder)
    torch.manual_seed(c.seed + dist.rank)  # sampling differs per process; the adapters above did not
    total = _total_steps(c, len(rows), dist.world)
    sampler = build_sampler(c, ac, tokenizer, folder)
    trainer_class: type[RLTrainer] = PPOTrainer if c.has_critic else GroupTrainer
    trainer = trainer_class(c, ac, tokenizer, rows, prompt_ids, reward, dist, total, sampler)
    resumed = _maybe_resume(run, trainer, dist)
    sampler.sync(ac, trainer.step)  # a resumed actor must reach a separate sampler before the first rollout
    started = time.monotonic()
    try:
        _loop(run, trainer, total, dist)
    finally:
        sampler.close()
    save_final(run, ac, tokenizer, dist)
    finish_run(run, started, trainer.step, ac.trained())
    if resumed:
        run.update_info(resumed_from=resumed)
    return run


def build_sampler(c: RLRunConfig, ac: ActorCritic, tokenizer: Any, folder: Path) -> Sampler:
    """transformers generation on the actor itself, or a vLLM engine that gets the adapter after each update."""
    if c.rollout_backend == "vllm":
        from tandemlm.align.ppo.vllm_rollout import VLLMSampler

        return VLLMSampler(folder, c, tokenizer)
    # ZeRO-3 gathers weights in every forward, a collective: processes done early keep stepping with the others.
    return TransformersSampler(tokenizer, c.max_completion_length, c.temperature, c.top_k, synced=zero_stage() == 3)


def print_plan(config: RLRunConfig) -> None:
    """``--plan``: the memory estimate from the model's config.json alone (no weights load or download)."""
    from tandemlm.align.ppo.plan import estimate, format_plan, inputs_from_config

    raw, source = plan_config_json(config.model, config.trust_remote_code)
    try:
        inputs = inputs_from_config(_typed_config(raw), config)
    except KeyError as exc:
        raise ConfigError(f"model {config.model}: {source} has no {exc.args[0]!r}; the plan needs a decoder's config") from None
    except ValueError as exc:  # PlanInputs' checks (e.g. lora_layers past the model's layers)
        raise ConfigError(f"model {config.model}: {exc}") from None
    plan = estimate(inputs)
    print(format_plan(plan, plan_budget(config, plan.weights)))


def plan_config_json(ref: str, trust_remote_code: bool = False) -> tuple[dict[str, Any], Path]:
    """(config.json as a dict, where it was read) for ``--plan``, fetching nothing but that one file.

    ``ref`` may be a config.json path, a folder holding one, or a hub id: only its config.json is fetched
    (``hf_hub_download``), from the local Hugging Face cache alone under HF_HUB_OFFLINE. Run folders and
    built-in names resolve locally as training would.
    """
    path = Path(ref).expanduser()
    if path.suffix == ".json":  # never a hub id: "folder/config.json" would otherwise look like one
        if not path.is_file():
            raise ConfigError(f"model: config file {path} does not exist")
        file = path
    elif (path / "config.json").is_file():
        file = path / "config.json"
    elif _is_hub_id(ref):
        file = _hub_config_file(ref)
    else:
        file = base_folder(ref, trust_remote_code) / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model: {file} is not a readable config.json ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model: {file} is not a config.json (it holds no JSON object)")
    return raw, file


def _is_hub_id(ref: str) -> bool:
    """``org/name`` that is no local path, run folder or built-in name (resolve_model's order)."""
    text = ref.strip()
    if Path(text).expanduser().exists() or text in BUILTIN_MODELS:
        return False
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf")


def _hub_config_file(repo: str) -> Path:
    """The hub repo's config.json alone: fetched when the hub answers, else the cached copy (HF_HUB_OFFLINE: cache only)."""
    from huggingface_hub import constants, hf_hub_download

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment now is what the user set.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    # Without a network hf_hub_download retries for half a minute before it falls back to the cache: ask first.
    unreachable = not offline and not _hub_answers(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo, "config.json", local_files_only=offline or unreachable))
    except Exception as exc:  # noqa: BLE001 - not cached, no network, gated, no such repo: all end in the one line
        why = "HF_HUB_OFFLINE is set" if offline else (
            f"{constants.ENDPOINT} cannot be reached" if unreachable else f"the hub did not give it ({str(exc).splitlines()[0][:200]})"
        )
        raise ConfigError(
            f"model {repo}: no config.json to plan from: {why} and none is cached in {constants.HF_HUB_CACHE}; "
            "pass --model a local model folder or a path to the model's config.json"
        ) from None


def _hub_answers(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection (a quick probe, as resolve_model makes)."""
    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or (80 if url.scheme == "http" else 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _typed_config(raw: dict[str, Any]) -> Any:
    """transformers' config class for a known ``model_type`` (it fills the defaults a config.json leaves out,
    e.g. Gemma 3's text_config); the plain dict for custom code, which is never run for a plan."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    return CONFIG_MAPPING[model_type].from_dict(raw) if model_type in CONFIG_MAPPING else raw


def plan_budget(config: RLRunConfig, weights: int, available: tuple[str, int] | None = None) -> tuple[str, int]:
    """(label, bytes) the trainer may use: ``available`` (this machine's, by default), less what an in-process
    vLLM engine takes for itself with ``rollout_backend: vllm`` (``weights``: the plan's, vLLM's copy on CPU)."""
    from tandemlm.align.ppo.plan import available_memory

    label, size = available if available is not None else available_memory()
    if config.rollout_backend != "vllm":
        return label, size
    from tandemlm.align.ppo.vllm_rollout import CPU_KV_CACHE_BYTES, GPU_MEMORY_UTILIZATION

    if label.startswith("GPU"):  # vLLM claims this share of the whole GPU up front (weights + KV cache)
        return f"{label} less vLLM's {GPU_MEMORY_UTILIZATION:.0%}", int(size * (1 - GPU_MEMORY_UTILIZATION))
    return f"{label} less vLLM's weights and KV cache", max(0, size - weights - CPU_KV_CACHE_BYTES)


def build_actor_critic(c: RLRunConfig, folder: Path) -> ActorCritic:
    """The base (loaded once), actor (and PPO's critic) adapters (same seed on every process), value head."""
    torch.manual_seed(c.seed)
    critic_init = _critic_from_reward(c, folder) if isinstance(c, PPORunConfig) else None
    return actor_critic_from_model(c, _on_device(load_model(folder, c), c), critic_init)


def _on_device(model: Any, c: RLRunConfig) -> Any:
    """The base on this process's GPU when there is one (QLoRA loads there already; DeepSpeed engines place theirs)."""
    if c.qlora or zero_stage():
        return model
    from accelerate import PartialState

    return model.to(PartialState().device)


def actor_critic_from_model(
    c: RLRunConfig, model: Any, critic_init: tuple[Any, dict[str, torch.Tensor], torch.Tensor] | None = None,
) -> ActorCritic:
    """Actor (and PPO's critic) on an already built ``model``: dropout off, checkpointing as configured.

    ``critic_init`` (a reward run's LoRA config, weights and head) starts the critic as that reward model.
    """
    _disable_dropout(model)
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hidden = int(model.config.get_text_config().hidden_size)
    actor_lora = lora_config(c, model)
    critic_lora = critic_init[0] if critic_init else actor_lora
    stage = zero_stage()  # DeepSpeed: one module per engine (the critic's adapter on its own base copy)
    ac = ActorCritic(
        model, actor_lora, critic_lora, hidden, separate_critic=stage > 0, skip_prefix=stage == 3, with_critic=c.has_critic,
    )
    if critic_init:
        from peft import set_peft_model_state_dict

        _, weights, head = critic_init
        set_peft_model_state_dict(ac.model, weights, adapter_name=CRITIC)
        ac.model.set_adapter(POLICY)
        with torch.no_grad():
            ac.value_head.summary.weight.copy_(head.float())
    return ac


def _critic_from_reward(c: PPORunConfig, folder: Path) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor] | None:
    """The reward run's (LoRA config, weights, head) when the critic should start from it, else None."""
    if c.critic_from_reward_model is False or not c.reward_model or not c.uses_lora:
        if c.critic_from_reward_model and not c.uses_lora:
            raise ConfigError("critic_from_reward_model needs lora (the critic is an adapter on the base)")
        return None
    if not shares_base(c.reward_model, folder):
        if c.critic_from_reward_model:
            raise ConfigError(f"critic_from_reward_model: {c.reward_model} is not a LoRA reward run on {folder}")
        return None
    return reward_adapter(c.reward_model)


def _disable_dropout(model: Any) -> None:
    """PPO's ratio is exp(new - old) of the same tokens: dropout would make it noise (TRL does the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _check_prompt_lengths(prompt_ids: list[list[int]], c: RLRunConfig, source: str) -> None:
    limit = c.max_length - c.max_completion_length
    if limit < 1:
        raise ConfigError(f"max_length ({c.max_length}) must exceed max_completion_length ({c.max_completion_length})")
    for number, ids in enumerate(prompt_ids, 1):
        if len(ids) > limit:
            raise ConfigError(
                f"{source} row {number}: the prompt is {len(ids)} tokens, more than max_length - max_completion_length "
                f"= {limit}; raise max_length or shorten the prompt"
            )


def _total_steps(c: RLRunConfig, rows: int, world: int) -> int:
    per_epoch = rows // (c.prompts_per_step * world)
    if per_epoch < 1:
        raise ConfigError(
            f"dataset has {rows} prompts, fewer than one step needs ({c.prompts_per_step} per process x {world} processes)"
        )
    return c.max_steps if c.max_steps > 0 else max(1, int(c.epochs * per_epoch))


def _maybe_resume(run: Run, trainer: RLTrainer, dist: Distributed) -> str | None:
    if not run.config.resume:
        return None
    for leftover in run.checkpoints.glob(".checkpoint-*.partial"):  # a save that a kill interrupted
        if dist.is_main:
            shutil.rmtree(leftover, ignore_errors=True)
    found = latest_checkpoint(run)
    if found is None:
        return None
    training, state = checkpoint.load_checkpoint(found, trainer.ac, dist.rank)
    trainer.load_training_state(training, state)
    record_session(run, resumed_from=found.name)
    return found.name


def _loop(run: Run, trainer: RLTrainer, total: int, dist: Distributed) -> None:
    from transformers import TrainerState

    c = run.config
    state = TrainerState(global_step=trainer.step, max_steps=total, is_world_process_zero=dist.is_main)
    callbacks = [MetricsLogger(run), HackingWatch(run), RichProgress(c.method)]
    for callback in callbacks:
        callback.on_train_begin(None, state, None)
    samples = run.dir / SAMPLES_FILE
    if dist.is_main:
        truncate_metrics(samples, trainer.step)  # a resumed run redoes the steps past its checkpoint
    try:
        while trainer.step < total:
            try:
                stats = trainer.train_step()
            except ConfigError:
                run.update_info(status="stopped", global_step=trainer.step)
                raise
            state.global_step, state.epoch = trainer.step, trainer.cursor.epoch + trainer.cursor.index / max(1, len(trainer.rows))
            for callback in callbacks:
                callback.on_step_end(None, state, None)
                if trainer.step % c.logging_steps == 0 or trainer.step == total:
                    callback.on_log(None, state, None, logs=stats)
            if dist.is_main and (trainer.step % c.logging_steps == 0 or trainer.step == total):
                append_jsonl(samples, {"step": trainer.step, "samples": trainer.last_samples})
            if trainer.step % c.save_steps == 0:  # the last step too: a finished run can be extended
                checkpoint.save_checkpoint(
                    run.checkpoints, trainer.step, trainer.ac, training=trainer.training_state(),
                    state=trainer.progress_state(), processes=dist, keep=c.save_total_limit,
                )
                for callback in callbacks:
                    callback.on_save(None, state, None)
    finally:
        for callback in callbacks:
            callback.on_train_end(None, state, None)


def save_final(run: Run, ac: ActorCritic, tokenizer: Any, dist: Distributed) -> Path:
    """final/: the actor as a PEFT adapter (or full weights) with the tokenizer; final/critic/ holds PPO's critic."""
    staging = run.dir / ".final.partial"
    weights = checkpoint.trained_weights(ac)  # every process: ZeRO-3 gathers the shards
    if dist.is_main:
        from safetensors.torch import save_file

        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if ac.lora:
            ac.model.peft_config[POLICY].save_pretrained(str(staging))
            save_file(weights["actor"], str(staging / "adapter_model.safetensors"))
        else:
            ac.model.save_pretrained(str(staging), state_dict=weights["actor"], safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if ac.has_critic:
            (staging / "critic").mkdir()
            for stem in ("critic", "value_head"):  # the actor is final/ itself
                save_file(weights[stem], str(staging / "critic" / f"{stem}.safetensors"))
        replace_dir(staging, run.final)
    dist.barrier()
    return run.final

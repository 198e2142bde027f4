"""Memory plan for a PPO run, worked out from the model's config before anything loads (`tandem align ppo --plan`).

The PPO run holds, at once: the base weights (shared by actor, critic and reference in LoRA mode: the reference
is the base with adapters disabled), the actor and critic LoRA adapters, the critic's value head, their AdamW
states and gradients, an optional reward model, and then either the rollout's working set (KV cache while
generating, no-grad logits while scoring) or the update's (activations and logits of a minibatch with grad).
With ``full_finetune`` the actor and critic are separate full copies and the reference is a third, frozen one.

Peak = weights + reward model + adapters + value head + optimizer + gradients + runtime
+ max(rollout phase, update phase). Every constant is in :data:`BYTES` or :data:`ACTIVATION` with its source.
Counts assume dense decoder blocks (Llama, Qwen2/3, Mistral): q/k/v/o + gate/up/down per layer. For MoE or MLA
configs :func:`inputs_from_config` counts the parameters on the meta device and approximates the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from tandemlm.align.ppo.model_shapes import (  # count_params_from_shapes also re-exported: tests import it from here
    NON_DENSE_KEYS,
    block_shapes,
    config_dict,
    count_on_meta,
    count_params_from_shapes,
    head_chunk_rows,
    tied_embeddings,
    transforms_logits,
)

GIB = 1024**3
MIB = 1024**2

# Bytes per stored number, one row per constant with its source. "Measured" rows: peak-RSS deltas on CPU (torch 2.13,
# glibc with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS) of the trainer's own code paths.
BYTES: dict[str, float] = {
    "nf4": 0.5,  # NF4 weight: 4 bits (bitsandbytes Linear4bit, QLoRA paper)
    "nf4_constants": 1 / 64 + 4 / (64 * 256),  # double-quantised absmax: 8 bit / 64 weights + fp32 / 256 absmaxes
    "kbit_unquantised": 4.0,  # embeddings/norms/lm_head under QLoRA: prepare_model_for_kbit_training makes them fp32
    "adapter": 4.0,  # LoRA A/B: PEFT keeps fp32 adapters on a bf16 base (LoraConfig autocast_adapter_dtype=True)
    "value_head": 4.0,  # the critic's Linear(hidden, 1), fp32 (policy.ValueHead)
    "adam_states": 8.0,  # AdamW exp_avg + exp_avg_sq, fp32 each
    "master": 4.0,  # fp32 master copy of bf16 weights in a full fine-tune (none for fp32 weights or fp32 adapters)
    "lora_input_cast": 4.0,  # bf16 base: each adapted linear saves an fp32 copy of its input (x.to(lora_A.dtype))
    # Per rollout logit of ONE decode step (batch x vocab): the step's fp32 logits, the /temperature copy and the
    # log-softmax that rollout.ChosenLogprobs keeps until the next step, alive with the KV cache.
    "rollout_logit": 12.0,
    # Logits of a plain head go through head_logprobs one chunk of rows at a time (model_shapes.head_chunk_rows);
    # none is kept for backward. Per logit of one chunk, no grad: the head's output (dtype bytes, added
    # separately), the fp32 /temperature copy, logsumexp's and the entropy's temporaries. Measured 11.2 (fp32, T 1)
    # and 15.3 (fp32, T 0.7) bytes: 12 + dtype.
    "score_logit_fp32": 12.0,
    # Per logit of one chunk with grad and entropy (backward: recomputed logits, softmax, gradient and casts).
    # Measured 24.3 (fp32 head, T 1 and 0.7).
    "update_logit": 24.0,
    # A head the model's forward transforms (soft-capping, logit scaling) keeps every kept logit instead
    # (micro-batch x (response + 1) x vocab): log_softmax and softmax saved plus their gradients, 6 fp32 copies.
    # Measured 24.2 (fp32 base), 24.0 (bf16 base) with grad; 8 + dtype without.
    "full_update_logit": 24.0,
    "full_score_logit_fp32": 8.0,
}

# Activations saved for backward, in numbers per token per decoder layer (times dtype bytes).
ACTIVATION: dict[str, float] = {
    # Llama/Qwen2 block, SDPA, no dropout: attention input + its RMSNorm output, q, the attention output (4h);
    # post-attention residual + its RMSNorm output (2h) -> 6h; k and v after RoPE -> 2 * kv_heads * head_dim;
    # gate, silu(gate), up, silu(gate)*up -> 4 * intermediate. Measured on CPU (fp32, 4 rows x 1024 tokens, h 512,
    # LoRA r16): 9830 numbers/token/layer without a padding mask vs 9728 here; a left-padding mask added ~20% more
    # (CPU SDPA with a mask). Cf. Korthikanti et al. 2022, 34*s*b*h bytes per GPT block in fp16 = 17h numbers.
    "layer_hidden": 6.0,
    "layer_kv": 2.0,
    "layer_mlp": 4.0,
    # Gradient checkpointing (transformers checkpoints each decoder layer): the layer input, h per token.
    # Measured 7.5 MB per layer for 4096 tokens x h 512 fp32 (8.0 predicted).
    "checkpoint_hidden": 1.0,
    # Graphs alive at once in the update: the trainer backpropagates the critic and then the actor
    # (trainer._critic_step, _actor_step), so one; TRL's PPOTrainer sums both losses (2).
    "update_graphs": 1.0,
}

# CUDA context and allocator slack, or the Python + torch + transformers runtime on CPU: ~0.5 GiB either way.
RUNTIME_BYTES = 0.5 * GIB
# Headroom `fits` keeps free by default: allocator fragmentation and transient copies the model leaves out.
DEFAULT_MARGIN = 0.10

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PlanInputs:
    """Model shapes and run settings: everything :func:`estimate` needs."""

    n_params: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    lora: bool = True  # False means a full fine-tune
    lora_r: int = 16
    lora_layers: int | None = None  # adapt only the last N layers; None = all
    lora_modules: tuple[str, ...] = ALL_LINEAR  # which linears of an adapted layer get adapters
    qlora: bool = False
    dtype_bytes: int = 2  # 2 = bf16, 4 = fp32
    batch_size: int = 8  # rollout batch (sequences generated per PPO step)
    minibatch_size: int = 4  # sequences per optimizer step in the update
    grad_accum: int = 1  # micro-batches per minibatch (rows per forward = minibatch_size / grad_accum)
    prompt_length: int = 256
    response_length: int = 256
    gradient_checkpointing: bool = True
    full_finetune: bool = False  # actor and critic are full copies, plus a frozen reference copy
    reward_model_params: int = 0  # a separate reward model held in memory (0: verifier, HTTP or a LoRA reward)
    critic: bool = True  # PPO trains a critic (adapter + value head); the critic-free algorithms do not
    cuda: bool = True  # where the run trains: sets head_logprobs' chunk size
    plain_head: bool = True  # False: the model's forward transforms the logits (no chunked head_logprobs)

    def __post_init__(self) -> None:
        if self.full_finetune or not self.lora:
            self.full_finetune, self.lora = True, False
        if self.qlora and not self.lora:
            raise ValueError("qlora needs lora (a 4-bit base cannot be fully fine-tuned)")
        if self.dtype_bytes not in (2, 4):
            raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {self.dtype_bytes}")
        for name in ("n_params", "hidden_size", "num_layers", "batch_size", "minibatch_size", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_layers is not None and not 1 <= self.lora_layers <= self.num_layers:
            raise ValueError(f"lora_layers must be in 1..{self.num_layers}, got {self.lora_layers}")

    @property
    def seq_len(self) -> int:
        """Tokens per sequence: prompt + response."""
        return self.prompt_length + self.response_length

    @property
    def micro_batch(self) -> int:
        """Rows per forward/backward in the update."""
        return max(1, self.minibatch_size // self.grad_accum)

    @property
    def adapted_layers(self) -> int:
        """Decoder layers that carry adapters (and so need activations in backward)."""
        return self.num_layers if self.lora_layers is None else self.lora_layers


@dataclass
class MemoryPlan:
    """Expected memory per part, in bytes, and the counts behind them."""

    inputs: PlanInputs
    lora_params: int  # one adapter (actor or critic)
    trainable_params: int  # actor + critic + value head
    weights: int
    reward_model: int
    adapters: int
    value_head: int
    optimizer: int
    gradients: int
    runtime: int
    rollout_kv_cache: int
    rollout_logits: int
    scoring_logits: int
    update_activations: int
    update_logits: int
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def static(self) -> int:
        """Bytes held through the whole run (gradients: the larger role's, freed after each optimizer step)."""
        return sum((self.weights, self.reward_model, self.adapters, self.value_head, self.optimizer, self.gradients,
                    self.runtime))

    @property
    def rollout_phase(self) -> int:
        """Working set while sampling (KV cache + logits) or scoring (no-grad logits), whichever is larger."""
        return max(self.rollout_kv_cache + self.rollout_logits, self.scoring_logits)

    @property
    def update_phase(self) -> int:
        """Working set of one micro-batch's forward and backward."""
        return self.update_activations + self.update_logits

    @property
    def total(self) -> int:
        """Expected peak: everything static plus the larger phase."""
        return self.static + max(self.rollout_phase, self.update_phase)

    def parts(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) rows in display order."""
        rows = [
            ("weights", self.weights), ("reward model", self.reward_model), ("adapters", self.adapters),
            ("value head", self.value_head), ("optimizer", self.optimizer), ("gradients", self.gradients),
            ("runtime", self.runtime), ("rollout KV cache", self.rollout_kv_cache),
            ("rollout logits", self.rollout_logits), ("scoring logits", self.scoring_logits),
            ("update activations", self.update_activations), ("update logits", self.update_logits),
        ]
        return [(label, size, self.notes.get(label, "")) for label, size in rows]


def lora_linearblock_shapes(inputs: PlanInputs) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of each linear in one dense decoder layer."""
    h, q_dim = inputs.hidden_size, inputs.num_attention_heads * inputs.head_dim
    kv_dim, inter = inputs.num_kv_heads * inputs.head_dim, inputs.intermediate_size
    return [("q_proj", h, q_dim), ("k_proj", h, kv_dim), ("v_proj", h, kv_dim), ("o_proj", q_dim, h),
            ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]


def lora_param_count(inputs: PlanInputs) -> int:
    """Parameters of one LoRA adapter: r * (in + out) per adapted linear, over the adapted layers."""
    per_layer = sum(i + o for name, i, o in lora_linearblock_shapes(inputs) if name in inputs.lora_modules)
    return inputs.lora_r * per_layer * inputs.adapted_layers


def block_linear_params(inputs: PlanInputs) -> int:
    """Weights of the decoder blocks' linears (what bitsandbytes quantises to 4 bit), biases left out."""
    return inputs.num_layers * sum(i * o for _, i, o in lora_linearblock_shapes(inputs))


def kv_cache_bytes(inputs: PlanInputs) -> int:
    """2 (k and v) * layers * kv_heads * head_dim * (prompt + response) * batch * dtype bytes."""
    i = inputs
    return 2 * i.num_layers * i.num_kv_heads * i.head_dim * i.seq_len * i.batch_size * i.dtype_bytes


def layer_activation_bytes(inputs: PlanInputs) -> float:
    """Bytes a trained decoder layer saves for backward, per token (:data:`ACTIVATION`, ``lora_input_cast``)."""
    a = ACTIVATION
    numbers = a["layer_hidden"] * inputs.hidden_size + a["layer_kv"] * inputs.num_kv_heads * inputs.head_dim
    numbers += a["layer_mlp"] * inputs.intermediate_size
    cast = 0.0
    if inputs.lora and inputs.dtype_bytes < 4:
        cast = BYTES["lora_input_cast"] * sum(i for name, i, _ in lora_linearblock_shapes(inputs) if name in inputs.lora_modules)
    return numbers * inputs.dtype_bytes + cast


def estimate(inputs: PlanInputs) -> MemoryPlan:
    """Expected memory of each part of an RL run (PPO, or a critic-free one with ``critic=False``) with these settings."""
    b, h, n = inputs.dtype_bytes, inputs.hidden_size, inputs.n_params
    lm_head = 0 if inputs.tie_word_embeddings else inputs.vocab_size * h
    head_params = h + 1 if inputs.critic else 0  # value head weight + bias
    roles = "actor + critic" if inputs.critic else "actor"
    notes: dict[str, str] = {}
    lora = 0
    if inputs.full_finetune:
        critic = n - lm_head if inputs.critic else 0  # a copy of the decoder stack: an untied lm_head is not copied
        weights, adapters, trained = (2 * n + critic) * b, 0, n + critic
        optimizer = trained * (BYTES["adam_states"] + (BYTES["master"] if b < 4 else 0))
        gradients = max(n, critic + head_params) * b
        notes["weights"] = f"{roles} + frozen reference, {'bf16' if b == 2 else 'fp32'}"
        notes["optimizer"] = "AdamW 2 fp32 states" + (" + fp32 master" if b < 4 else "") + f", {roles}"
    else:
        lora = lora_param_count(inputs)
        trained = (2 if inputs.critic else 1) * lora
        if inputs.qlora:
            quantised = block_linear_params(inputs)
            weights = quantised * (BYTES["nf4"] + BYTES["nf4_constants"]) + (n - quantised) * BYTES["kbit_unquantised"]
            notes["weights"] = f"NF4 block linears + fp32 rest; one base for {roles}, reference"
        else:
            weights = n * b
            notes["weights"] = f"one base for {roles}, reference"
        adapters = trained * BYTES["adapter"]
        optimizer = trained * BYTES["adam_states"]
        gradients = (lora + head_params) * BYTES["adapter"]
        notes["adapters"] = f"{roles}, {lora:,} params each (r={inputs.lora_r})"
        notes["optimizer"] = "AdamW 2 fp32 states, adapters" + (" + value head" if inputs.critic else "")
    optimizer += head_params * BYTES["adam_states"]
    notes["gradients"] = "one role at a time (critic, then actor)" if inputs.critic else "the actor's"

    rows, seq, response = inputs.micro_batch, inputs.seq_len, inputs.response_length
    grad_layers = inputs.num_layers if inputs.full_finetune else inputs.adapted_layers
    layer = layer_activation_bytes(inputs) * rows * seq
    if inputs.gradient_checkpointing:
        graph = ACTIVATION["checkpoint_hidden"] * h * rows * seq * b * grad_layers + layer
        notes["update activations"] = f"{rows} rows: checkpoints of {grad_layers} layers + one layer recomputed"
    else:
        graph = layer * grad_layers
        notes["update activations"] = f"{rows} rows x {seq} tokens x {grad_layers} layers"
    kept_rows = rows * (response + 1)
    scored_rows = min(inputs.micro_batch, inputs.batch_size) * (response + 1)
    if inputs.plain_head:  # head_logprobs: one chunk of rows at a time
        chunk = head_chunk_rows(inputs.vocab_size, inputs.cuda)
        kept, scored = min(kept_rows, chunk) * inputs.vocab_size, min(scored_rows, chunk) * inputs.vocab_size
        update_logit, score_logit = BYTES["update_logit"], BYTES["score_logit_fp32"]
        notes["scoring logits"] = notes["update logits"] = f"chunks of {chunk} token rows x {inputs.vocab_size} vocab"
    else:  # logits_to_keep = response + 1, every row at once
        kept, scored = kept_rows * inputs.vocab_size, scored_rows * inputs.vocab_size
        update_logit, score_logit = BYTES["full_update_logit"], BYTES["full_score_logit_fp32"]
        notes["scoring logits"] = f"chunks of {inputs.micro_batch} rows, no grad"
        notes["update logits"] = f"{rows} rows x {response + 1} positions x {inputs.vocab_size} vocab"
    notes["rollout KV cache"] = f"batch {inputs.batch_size} x {seq} tokens"
    notes["rollout logits"] = f"one decode step: batch {inputs.batch_size} x {inputs.vocab_size} vocab"
    notes["reward model"] = "separate reward model" if inputs.reward_model_params else ""
    return MemoryPlan(
        inputs=inputs, lora_params=lora, trainable_params=trained + head_params, weights=int(weights),
        reward_model=inputs.reward_model_params * b, adapters=int(adapters),
        value_head=int(head_params * BYTES["value_head"]), optimizer=int(optimizer), gradients=int(gradients),
        runtime=int(RUNTIME_BYTES), rollout_kv_cache=kv_cache_bytes(inputs),
        # rollout.ChosenLogprobs keeps one step's log-softmax, never every step's logits
        rollout_logits=int(inputs.batch_size * inputs.vocab_size * BYTES["rollout_logit"]),
        scoring_logits=int(scored * (b + score_logit)),
        update_activations=int(ACTIVATION["update_graphs"] * graph),
        update_logits=int(kept * update_logit),
        notes=notes,
    )


def settings_from_run(run: Any, cuda: bool | None = None) -> dict[str, Any]:
    """PlanInputs run settings from a PPO run config (``PPORunConfig`` or anything with its field names).

    Auto fields (``lora``, ``bf16``, ``gradient_checkpointing`` left None) resolve as the run would on this
    machine: on with a CUDA GPU, off on CPU. The prompt length is the longest allowed, max_length - response.
    """
    if cuda is None:
        cuda = available_memory()[0].startswith("GPU")

    def auto(name: str) -> bool:
        value = getattr(run, name, None)
        return cuda if value is None else bool(value)

    lora = bool(getattr(run, "qlora", False)) or auto("lora")
    response = int(run.max_completion_length)
    target = str(getattr(run, "lora_target", "all-linear"))
    return {
        "lora": lora,
        "qlora": bool(getattr(run, "qlora", False)),
        "lora_r": int(run.lora_r),
        "lora_layers": getattr(run, "lora_layers", None),
        "lora_modules": ALL_LINEAR if target == "all-linear" else tuple(t.strip() for t in target.split(",") if t.strip()),
        "dtype_bytes": 2 if auto("bf16") else 4,
        "batch_size": int(run.batch_size),
        "minibatch_size": int(getattr(run, "rows_per_minibatch", None) or getattr(run, "minibatch_size", run.batch_size)),
        "grad_accum": int(getattr(run, "grad_accum", 1)),
        "prompt_length": max(1, int(run.max_length) - response),
        "response_length": response,
        "gradient_checkpointing": auto("gradient_checkpointing"),
        "critic": bool(getattr(run, "has_critic", True)),
        "cuda": cuda,
    }


def inputs_from_config(config: Any, run: Any = None, *, n_params: int | None = None, **settings: Any) -> PlanInputs:
    """:class:`PlanInputs` from a config.json dict or PretrainedConfig (``text_config`` nesting read), with run
    settings from ``run`` (see :func:`settings_from_run`) and/or keywords (``lora_r=8, batch_size=16``; keywords
    win). ``n_params`` is counted from the architecture's shapes when not given (meta device for MoE/MLA)."""
    cfg = config_dict(config)
    h, heads, kv_heads, head_dim, inter = block_shapes(cfg)
    dense = not any(cfg.get(key) for key in NON_DENSE_KEYS)
    if cfg.get("kv_lora_rank"):  # MLA: transformers caches decompressed per-head keys (nope + rope) and values
        kv_heads = heads
        k_dim = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
        head_dim = math.ceil((k_dim + int(cfg.get("v_head_dim") or k_dim)) / 2)
    if n_params is None:
        n_params = count_params_from_shapes(cfg) if dense else count_on_meta(cfg)
    values = {**(settings_from_run(run) if run is not None else {}), **settings}
    return PlanInputs(
        n_params=int(n_params), hidden_size=h, num_layers=int(cfg["num_hidden_layers"]), num_kv_heads=kv_heads,
        head_dim=head_dim, num_attention_heads=heads, intermediate_size=inter,
        vocab_size=int(cfg["vocab_size"]), tie_word_embeddings=tied_embeddings(cfg),
        plain_head=not transforms_logits(cfg), **values,
    )


def available_memory() -> tuple[str, int]:
    """(label, bytes): total memory of CUDA device 0 when torch sees one, else the RAM free now (psutil).

    Reads device properties only: no CUDA context, no allocation.
    """
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"GPU ({props.name})", int(props.total_memory)
    except Exception:  # noqa: BLE001 - a broken CUDA install falls back to RAM
        pass
    import psutil  # a tandemlm dependency

    return "free RAM", int(psutil.virtual_memory().available)


def fits(plan: MemoryPlan, available: int, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether the expected peak leaves ``margin`` (a fraction) of ``available`` free."""
    return plan.total <= available * (1.0 - margin)


def human(size: float) -> str:
    """Bytes as GiB (1 GiB and up) or MiB."""
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / MIB:.1f} MiB"


def suggestions(plan: MemoryPlan) -> list[tuple[str, int]]:
    """(`tandem align ppo` flag, bytes it saves) for each single change that shrinks the peak, biggest first."""
    i = plan.inputs
    changes: list[tuple[str, dict[str, Any]]] = [("--lora", {"lora": True, "full_finetune": False})] if i.full_finetune else []
    changes += [("--qlora", {"qlora": True})] if i.lora and not i.qlora else []
    changes += [("--lora-r 8", {"lora_r": 8})] if i.lora and i.lora_r > 8 else []
    changes += [] if i.gradient_checkpointing else [("--gradient-checkpointing", {"gradient_checkpointing": True})]
    if i.micro_batch > 1 and i.minibatch_size % (2 * i.grad_accum) == 0:  # smaller micro-batches, same updates
        changes.append((f"--grad-accum {2 * i.grad_accum}", {"grad_accum": 2 * i.grad_accum}))
    changes += [(f"--batch-size {i.batch_size // 2}", {"batch_size": i.batch_size // 2})] if i.batch_size > 1 else []
    half = i.response_length // 2
    changes += [(f"--max-completion-length {half}", {"response_length": half})] if half else []
    saved = [(flag, plan.total - estimate(replace(i, **change)).total) for flag, change in changes]
    return sorted([(flag, size) for flag, size in saved if size > 0], key=lambda item: -item[1])


def verdict(plan: MemoryPlan, label: str, available: int, margin: float = DEFAULT_MARGIN) -> str:
    """One line: fits with how much spare, or what it needs and what to try (each change's saving)."""
    if fits(plan, available, margin):
        return f"fits in {available / GIB:.1f} GiB {label} with {human(available - plan.total)} spare"
    tips = ", ".join(f"{flag} (-{human(size)})" for flag, size in suggestions(plan)) or "a bigger device"
    return (
        f"does not fit: needs {human(plan.total)}, has {human(available)} {label} "
        f"(keeping {margin:.0%} free); try {tips}"
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(plan: MemoryPlan, available: tuple[str, int] | None = None, margin: float = DEFAULT_MARGIN) -> str:
    """Plain-text table of the parts, the phases, the peak and a verdict line (``available`` from
    :func:`available_memory` when not given)."""
    label, size = available if available is not None else available_memory()
    inputs = plan.inputs
    mode = "full fine-tune" if inputs.full_finetune else ("QLoRA" if inputs.qlora else "LoRA")
    head = (
        f"{'PPO' if inputs.critic else 'critic-free RL'} memory plan: {_count(inputs.n_params)} params, {mode}, "
        f"{'bf16' if inputs.dtype_bytes == 2 else 'fp32'}, batch {inputs.batch_size}, "
        f"minibatch {inputs.minibatch_size}, prompt {inputs.prompt_length} + response {inputs.response_length}, "
        f"gradient checkpointing {'on' if inputs.gradient_checkpointing else 'off'}"
    )
    rows = [(name, human(value), note) for name, value, note in plan.parts() if value or name == "weights"]
    rows.append(("= rollout phase", human(plan.rollout_phase), "KV cache + decode logits, or scoring logits"))
    rows.append(("= update phase", human(plan.update_phase), "activations + logits"))
    rows.append(("= peak", human(plan.total), "static parts + the larger phase"))
    width = max(len(r[0]) for r in rows)
    size_width = max(len(r[1]) for r in rows)
    lines = [head, ""]
    for name, value, note in rows:
        lines.append(f"  {name:<{width}}  {value:>{size_width}}  {note}".rstrip())
    lines += ["", verdict(plan, label, size, margin)]
    return "\n".join(lines)

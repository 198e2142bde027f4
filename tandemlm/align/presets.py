"""Named presets: partial configs selected with ``--preset NAME``, one row per (method, preset).

``cpu-demo`` runs on 2 CPU cores with the built-in SmolLM2-135M: LoRA on the last layers only (the
backward pass stops there), short sequences, tiny batches, one torch thread (fastest on a shared
machine). Their numbers are recorded in scripts/demo_align.sh. GPU recipes live in recipes/*.yaml.
"""

from __future__ import annotations

from typing import Any

# Shared by every cpu-demo row.
_CPU_DEMO: dict[str, Any] = {
    "model": "smollm2",
    "lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_layers": 8,
    "max_length": 128,
    "threads": 1,
    "lr_scheduler": "constant",
    "save_steps": 10,
    "logging_steps": 1,
    "eval_prompts": 60,
    "eval_max_new_tokens": 24,
}

# Shared by the critic-free family's cpu-demo rows (capitals, verifier reward, like ppo's).
_GROUP_DEMO: dict[str, Any] = {
    **_CPU_DEMO, "dataset": "builtin:capitals_train", "eval_dataset": "builtin:capitals_test",
    "max_steps": 30, "batch_size": 16, "minibatch_size": 8, "num_generations": 4, "max_completion_length": 24,
    "temperature": 1.0, "top_k": 0, "rewards": "verifier",
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sft": {
        "cpu-demo": {**_CPU_DEMO, "dataset": "builtin:sft_train", "max_steps": 20, "batch_size": 8, "learning_rate": 2e-4},
    },
    "reward": {
        "cpu-demo": {
            **_CPU_DEMO, "dataset": "builtin:prefs_train", "eval_dataset": "builtin:prefs_test",
            "max_steps": 40, "batch_size": 8, "learning_rate": 3e-4,
        },
    },
    "dpo": {
        "cpu-demo": {
            **_CPU_DEMO, "dataset": "builtin:prefs_train", "eval_dataset": "builtin:prefs_test",
            "max_steps": 30, "batch_size": 8, "learning_rate": 1e-4, "beta": 0.1,
            # RPO: DPO plus the chosen answers' NLL. Plain DPO lowers the chosen likelihood too, and its
            # samples drifted (the reward model preferred the reference); the NLL term keeps them on track.
            "loss_type": "sigmoid,sft", "loss_weights": "1,1",
        },
    },
    "kto": {
        "cpu-demo": {
            **_CPU_DEMO, "dataset": "builtin:prefs_train", "eval_dataset": "builtin:prefs_test",
            "max_steps": 30, "batch_size": 8, "learning_rate": 1e-4, "beta": 0.1,
        },
    },
    "ppo": {
        "cpu-demo": {
            **_CPU_DEMO, "dataset": "builtin:capitals_train", "eval_dataset": "builtin:capitals_test",
            # 16 prompts x 1 sample per step for 30 steps: the same 480 generated samples as grpo's cpu-demo.
            # With a cold critic, lambda 1 gives the early tokens ("The capital of ...") the full credit; at
            # lr 1e-3 with 4 PPO epochs the policy drifted to 0.66 nats/token of KL in 15 steps, at lr 5e-4,
            # 2 epochs and beta 0.05 to 0.24; beta 0.1 held it at 0.16 with a +0.28 verifier gain.
            "max_steps": 30, "batch_size": 16, "minibatch_size": 8, "ppo_epochs": 2, "max_completion_length": 24,
            "temperature": 1.0, "learning_rate": 5e-4, "critic_learning_rate": 2e-3, "beta": 0.1, "lam": 1.0,
            "rewards": "verifier",
        },
    },
    # The critic-free family: 4 prompts x 4 samples per step for 30 steps, the same 480 generated samples as ppo's
    # cpu-demo. Two minibatches per rollout, so the second is off-policy and each algorithm's clip acts.
    # GRPO's k3 term held KL at 0.13-0.15 nats/token at lr 1e-3. DAPO, GSPO and DCPO have no KL term in their
    # papers; on this 135M model at lr 5e-4 GSPO's tiny sequence clip held KL at 0.16, but DCPO drifted to
    # 0.67 nats/token and DAPO to 0.44, so their cpu-demos add GRPO's beta 0.04 (DCPO then: 0.13).
    # DAPO's dynamic sampling drew 576 samples in 16 steps on capitals (75 all-equal groups dropped): 13 steps
    # keep it near the 480.
    # Its overlong shaping is off here: with 24 tokens, a quarter-length buffer penalises lengths 18-24, where
    # most of the base model's answers end, so the penalty outweighed the verifier and taught short answers
    # (+17.2 points at 0.29 nats/token with it, +22.8 at 0.10 without; runs/rl-family in README).
    "grpo": {"cpu-demo": {**_GROUP_DEMO, "learning_rate": 1e-3, "beta": 0.04}},
    "dapo": {"cpu-demo": {
        **_GROUP_DEMO, "learning_rate": 5e-4, "beta": 0.04, "max_steps": 13, "max_sampling_tries": 3, "overlong_buffer": 0,
    }},
    "gspo": {"cpu-demo": {**_GROUP_DEMO, "learning_rate": 5e-4}},
    "dcpo": {"cpu-demo": {**_GROUP_DEMO, "learning_rate": 5e-4, "beta": 0.04}},
}


def preset_values(method: str, name: str) -> dict[str, Any]:
    """The preset ``name`` for ``method``; an unknown name lists the method's presets."""
    known = PRESETS.get(method, {})
    if name not in known:
        raise KeyError(f"unknown preset {name!r} for {method}; known presets: {', '.join(sorted(known)) or 'none'}")
    return dict(known[name])

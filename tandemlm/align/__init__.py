"""Alignment on TRL's trainers, with shared machinery the PPO trainer reuses.

Modules, one job each: ``config`` (dataclass configs, YAML + flags), ``presets`` (named partial
configs), ``data`` (load and check conversational data), ``datagen`` and ``tasks`` (built-in data
and verifiers), ``model`` (base, tokenizer, LoRA/QLoRA), ``prepare`` (data -> run folder -> model),
``run`` (run folder, checkpoints, resume, final save), ``callbacks`` and ``plots`` (metrics.jsonl,
hacking watch, progress, PNGs), ``rewards`` (GRPO reward functions), ``sampling`` (batched
generation and log-probs), ``evaluate`` (policy vs reference), ``merge`` (LoRA into base), and
one ``run_<method>`` per method: ``sft``, ``reward``, ``dpo``, ``kto``, ``grpo`` (``registry``).
"""

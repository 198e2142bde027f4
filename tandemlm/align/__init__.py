"""Alignment on TRL's trainers and our own PPO trainer, in two layers with no import cycles.

Lower layer, knows no method (PPO and the TRL methods build on it): ``errors`` (ConfigError),
``metrics`` (metrics.jsonl: append, read, truncate), ``config`` (AlignConfig, YAML + flags,
``help_field``/``check_types``), ``presets`` (named partial configs), ``data`` (load and check
conversational data), ``datagen`` and ``tasks`` (built-in data and verifiers), ``run_folder`` (a
run's files read from run.json without its config: paths, checkpoints, final save, processes),
``model`` (base folder, tokenizer, LoRA/QLoRA, threads), ``plots`` and ``callbacks`` (PNGs, the
metrics logger, hacking watch, progress), ``run`` (Run = folder + config, prepare/resume, train,
``Method``), ``rewards`` (reward spec and builders: verifier, reward model; extend with
``register_reward``), ``sampling`` (batched generation and log-probs), ``prepare`` (data -> run
folder -> model) and ``merge`` (LoRA into base).

Method layer: one module per method, each with its config class and ``METHOD`` (``sft``, ``reward``,
``dpo``, ``kto``, ``grpo``, the ``ppo`` package); ``registry`` (the only module that imports them
all; ``open_run`` reads a run back with its method's config class); ``evaluate`` (policy vs
reference, needs a run's config). ``tests/align/test_layers.py`` checks the layers and that no import,
even one inside a function, closes a cycle.
"""

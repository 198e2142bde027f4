"""The set-up every ``run_<method>`` starts with: data first, then the run folder, then the model.

Data is read and checked before anything heavy loads, so a bad row fails in a second, not after
a minute of loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tandemlm.align.config import AlignConfig
from tandemlm.align.data import load_dataset
from tandemlm.align.model import base_folder, load_model, load_tokenizer, lora_config, set_threads
from tandemlm.align.run import Run, prepare_run

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class Prepared:
    run: Run
    model: Any
    tokenizer: Any
    train: Dataset
    eval: Dataset | None
    peft_config: Any

    @property
    def config(self) -> Any:
        """The resolved config (auto fields filled)."""
        return self.run.config


def quiet_libraries() -> None:
    """Turns off the tqdm bars of datasets and transformers: the run's own rich bar reports progress."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def prepare(config: AlignConfig, head: str = "causal", data_method: str | None = None) -> Prepared:
    """Loads data (checked), makes the run folder, loads tokenizer and model, builds the LoRA config.

    ``head`` is ``causal`` for policies and ``score`` for reward models; ``data_method`` picks the
    data formats to accept (default: the config's method).
    """
    quiet_libraries()
    method = data_method or config.method
    train = load_dataset(config.dataset, method)
    evaluation = load_dataset(config.eval_dataset, method) if config.eval_dataset else None
    set_threads(config.threads)
    folder = base_folder(config.model, config.trust_remote_code)
    run = prepare_run(config, folder)
    tokenizer = load_tokenizer(folder, config.trust_remote_code)
    model = load_model(folder, run.config, head=head)
    if head == "score":
        model.config.pad_token_id = tokenizer.pad_token_id  # the score head reads the last non-pad token
    peft = lora_config(run.config, model, task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM")
    return Prepared(run, model, tokenizer, train, evaluation, peft)

"""Our GRPO, DAPO and GSPO losses against TRL 1.16's own loss code, on one fixed batch, to 1e-6 (loss and gradient).

TRL's ``GRPOTrainer`` is built for real on the tiny Llama, so every switch goes through ``GRPOConfig`` and TRL's
``__init__`` as in a run; then its ``_compute_loss(model, inputs)`` runs on the batch with
``_get_per_token_logps_and_entropies`` replaced by a function that returns our fixed log-probs (a leaf tensor, so
the gradient TRL's loss sends back to the log-probs can be compared too). The switches that would change the loss
are off or 1: no vLLM (no importance-sampling correction), ``top_entropy_quantile=1`` (no entropy mask),
``delta=None`` (no two-sided clip), no off-policy mask, no entropy bonus, no MoE aux loss, one process, one
accumulation step and ``steps_per_generation=1`` (so DAPO's ``num_items_in_batch`` normaliser is the token count).

Where TRL 1.16 differs from the papers (or from what one might expect):

- Its default ``loss_type`` is ``"dapo"`` (token mean), not ``"grpo"``; ``"grpo"`` is the GRPO paper's
  per-response token mean averaged over responses (our ``"seq-mean-token-mean"``), except that a response with no
  token counts as 0 in the average over all rows (ours leaves it out; the batch here has none).
- ``use_bias_correction_kl`` defaults to True: the k3 KL term is multiplied by the importance ratio
  ``exp(logp - old_logp)`` (DeepSeek-V3.2), unlike the GRPO paper's plain ``beta * k3``. We switch it off for the
  parity; the test also pins what TRL's default computes instead.
- ``"dapo"`` divides by ``num_items_in_batch``, the token count of the whole *generation* batch (all processes),
  rescaled by accumulation steps / ``steps_per_generation``: it is a token mean only when the loss sees the whole
  generation batch at once, as here; over micro-batches it is a token mean of the whole generation batch.
- For GSPO its warning names ``loss_type="grpo"`` as the paper's setup (a sequence ratio with ``"dapo"`` weighs
  each sequence by its length). TRL 1.16 has no ``"sequence_token"`` level, so GSPO-token (our
  ``token_level=True``) cannot be compared with it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tandemlm.align.ppo.maths import aggregate_tokens, kl_penalty, policy_loss, sequence_policy_loss

# Four right-padded responses (TRL pads completions on the right), 5 positions, float64.
# Log-ratios logp - old_logp on the real tokens, and one advantage per response:
#  r0 A=+1.2 [0.3, -0.3, 0.1, -0.1, 0.0005]: ratio 1.35 clipped (A>0), 0.74 below the band but unclipped (A>0);
#            sequence mean 0.0001 -> s = 1.0001, inside GSPO's band [1 - 3e-4, 1 + 4e-4]
#  r1 A=-0.7 [0.5, -0.4, -0.1, 0.05]: 1.65 unclipped (A<0), 0.67 clipped (A<0); mean 0.0125: s above, A<0: unclipped
#  r2 A=-0.4 [-0.2, -0.25, 0.02]: 0.78 clipped (A<0); mean -0.143: s below the band, A<0: the sequence is clipped
#  r3 A=+1.5 [0.35, 0.22]: 1.42 clipped (A>0); 1.246 clipped by clip 0.2 but not by DAPO's 0.28; s above: clipped
LOG_RATIOS = [[0.3, -0.3, 0.1, -0.1, 0.0005], [0.5, -0.4, -0.1, 0.05], [-0.2, -0.25, 0.02], [0.35, 0.22]]
ADVANTAGES = [1.2, -0.7, -0.4, 1.5]
LOGP = [[-0.5, -1.2, -2.0, -0.3, -0.9], [-1.5, -0.2, -0.7, -3.1], [-0.05, -2.2, -1.1], [-0.4, -1.7]]
REF_DELTA = [[0.1, -0.2, 0.3, 0.0, -0.1], [0.25, -0.3, 0.05, 0.2], [-0.15, 0.1, 0.3], [0.2, -0.25]]
WIDTH = 5
PAD_LOGP, PAD_OLD, PAD_REF = -2.5, -0.5, -4.0  # finite garbage: a loss that read padding would change


def _rows(rows: list[list[float]], fill: float) -> torch.Tensor:
    return torch.tensor([r + [fill] * (WIDTH - len(r)) for r in rows], dtype=torch.float64)


def batch() -> dict[str, torch.Tensor]:
    mask = _rows([[1.0] * len(r) for r in LOG_RATIOS], 0.0).long()
    logp = _rows(LOGP, PAD_LOGP)
    old = torch.where(mask > 0, logp - _rows(LOG_RATIOS, 0.0), PAD_OLD)
    ref = torch.where(mask > 0, logp + _rows(REF_DELTA, 0.0), PAD_REF)
    return {"logp": logp, "old": old, "ref": ref, "mask": mask, "advantages": torch.tensor(ADVANTAGES, dtype=torch.float64)}


@pytest.fixture(scope="module")
def trl_trainer(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """``trl_trainer(**grpo_config_fields)``: a real TRL ``GRPOTrainer`` for that configuration (built once per module)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions: list[Any], **_: Any) -> list[float]:  # never called: nothing is generated
        return [0.0] * len(completions)

    built: dict[tuple[tuple[str, Any], ...], Any] = {}

    def build(**fields: Any) -> Any:
        key = tuple(sorted(fields.items()))
        if key not in built:
            args = GRPOConfig(
                output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=WIDTH, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, use_vllm=False, top_entropy_quantile=1.0, delta=None,
                off_policy_mask_threshold=None, entropy_coef=0.0, **fields,
            )
            prompts = Dataset.from_dict({"prompt": ["What is the capital of France?"] * 4})
            trainer = GRPOTrainer(model=str(tiny_llama), reward_funcs=reward, args=args, train_dataset=prompts)
            # One accumulation step of one process: TRL's normalisers are then exactly the batch's own.
            trainer.current_gradient_accumulation_steps = 1
            assert trainer.accelerator.num_processes == 1 and args.steps_per_generation == 1
            assert not (trainer.use_vllm or trainer._entropy_bonus_enabled or trainer.aux_loss_enabled)
            trainer.model.train()  # TRL's "train" branch, the one a run takes
            built[key] = trainer
        return built[key]

    return build


def trl_loss(trainer: Any, b: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> tuple[float, torch.Tensor]:
    """TRL's ``_compute_loss`` on the batch: its loss and the gradient it sends to the log-probs."""
    logp = b["logp"].clone().requires_grad_()
    monkeypatch.setattr(
        trainer, "_get_per_token_logps_and_entropies",
        lambda *args, **kwargs: (logp, torch.zeros_like(logp), None),  # (log-probs, entropies, MoE aux loss)
    )
    rows = b["mask"].shape[0]
    inputs = {
        "prompt_ids": torch.ones(rows, 3, dtype=torch.long), "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": torch.ones_like(b["mask"]), "completion_mask": b["mask"],
        "advantages": b["advantages"], "old_per_token_logps": b["old"], "ref_per_token_logps": b["ref"],
        "num_items_in_batch": b["mask"].sum(),  # what TRL gathers: the generation batch's completion tokens
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), logp.grad


def our_loss(fn: Any, b: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    logp = b["logp"].clone().requires_grad_()
    loss = fn(logp)
    loss.backward()
    return loss.item(), logp.grad


def assert_same(ours: tuple[float, torch.Tensor], theirs: tuple[float, torch.Tensor]) -> None:
    assert ours[0] == pytest.approx(theirs[0], abs=1e-6, rel=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=0)


def test_grpo_with_k3_kl_matches_trl(trl_trainer, monkeypatch):
    b = batch()
    beta = 0.04

    def grpo(logp: torch.Tensor, kl_weight: torch.Tensor | None = None) -> torch.Tensor:
        loss, _ = policy_loss(logp, b["old"], b["advantages"], b["mask"], clip=0.2, aggregate="seq-mean-token-mean")
        kl = kl_penalty(logp, b["ref"], "k3") * (1.0 if kl_weight is None else kl_weight(logp))
        return loss + beta * aggregate_tokens(kl, b["mask"], "seq-mean-token-mean")

    paper = trl_trainer(loss_type="grpo", beta=beta, epsilon=0.2, use_bias_correction_kl=False)
    assert_same(our_loss(grpo, b), trl_loss(paper, b, monkeypatch))
    # TRL's default weighs each token's k3 by its importance ratio (with gradient): not the paper's term...
    default = trl_trainer(loss_type="grpo", beta=beta, epsilon=0.2)
    theirs = trl_loss(default, b, monkeypatch)
    assert abs(theirs[0] - our_loss(grpo, b)[0]) > 1e-5  # 1e-4 here, a hundred times the tolerance
    # ...but exactly that: our aggregation of k3 * exp(logp - old_logp)
    assert_same(our_loss(lambda logp: grpo(logp, lambda lp: torch.exp(lp - b["old"])), b), theirs)


def test_dapo_matches_trl(trl_trainer, monkeypatch):
    b = batch()
    trainer = trl_trainer(loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28)
    ours = our_loss(lambda logp: policy_loss(logp, b["old"], b["advantages"], b["mask"], clip=0.2, clip_high=0.28)[0], b)
    assert_same(ours, trl_loss(trainer, b, monkeypatch))
    # r3's ratio 1.246 lies between 1.2 and 1.28: a symmetric clip would zero its gradient, DAPO's does not
    assert ours[1][3, 1] != 0


def test_gspo_matches_trl(trl_trainer, monkeypatch):
    b = batch()
    # TRL's recommended GSPO setup (its docs and warning): sequence-level ratios, "grpo" loss, the paper's tiny clips
    trainer = trl_trainer(importance_sampling_level="sequence", loss_type="grpo", beta=0.0, epsilon=3e-4, epsilon_high=4e-4)
    ours = our_loss(
        lambda logp: sequence_policy_loss(logp, b["old"], b["advantages"], b["mask"], clip=3e-4, clip_high=4e-4)[0], b
    )
    assert_same(ours, trl_loss(trainer, b, monkeypatch))
    # r0 (inside the band) and r1 (A<0, above it) move; r2 and r3 are clipped sequences: no gradient at all
    grad = ours[1]
    assert (grad[0, :5] != 0).all() and (grad[1, :4] != 0).all() and (grad[2:] == 0).all()
    assert math.isclose(grad[0, 0].item(), grad[0, 4].item())  # one weight per sequence: the same on every token

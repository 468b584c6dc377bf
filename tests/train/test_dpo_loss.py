"""The preference losses against TRL's own DPO trainer on the same log-probs, and their fixed points."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rrg3d.train.dpo import preference_loss

trl = pytest.importorskip("trl")


def _trl_loss(per_token: torch.Tensor, mask: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              beta: float, loss_types: list[str], loss_weights: list[float]) -> tuple[torch.Tensor, dict]:
    """TRL's ``DPOTrainer._compute_loss`` on given per-token log-probs ([chosen; rejected] rows, shifted) with
    precomputed reference log-probs: the trainer's own code path, without a model or a dataset."""
    from trl.trainer.dpo_trainer import DPOTrainer

    rows, width = per_token.shape
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token * mask, entropy=torch.zeros(rows, width),
                               mean_logits=torch.zeros(rows, width), is_top1=torch.zeros(rows, width, dtype=torch.bool))

    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                              ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=loss_types, loss_weights=loss_weights, beta=beta, use_weighting=False,
                              _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(rows, width + 1, dtype=torch.long), "attention_mask": completion_mask * 0 + 1,
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, metrics["train"]


@pytest.mark.parametrize(("kind", "loss_types", "weights"), [("sigmoid", ["sigmoid"], [1.0]),
                                                              ("ipo", ["ipo"], [1.0]),
                                                              ("rpo", ["sigmoid", "sft"], [1.0, 0.7])])
def test_losses_equal_trl_on_the_same_log_probs(kind, loss_types, weights):
    generator = torch.Generator().manual_seed(0)
    batch, width, beta = 4, 9, 0.1
    per_token = -torch.rand(2 * batch, width, generator=generator, dtype=torch.float64) * 3
    lengths = torch.tensor([9, 4, 7, 1, 3, 9, 5, 6])
    mask = (torch.arange(width)[None] >= width - lengths[:, None]).to(torch.float64)  # report tokens at the end
    reference = -torch.rand(2 * batch, generator=generator, dtype=torch.float64) * 20
    summed = (per_token * mask).sum(1)
    tokens = mask.sum(1)
    expected, trl_metrics = _trl_loss(per_token, mask, reference[:batch], reference[batch:], beta, loss_types,
                                      weights)
    loss, metrics = preference_loss(summed[:batch], summed[batch:], reference[:batch], reference[batch:], beta=beta,
                                    kind=kind, chosen_tokens=tokens[:batch], rejected_tokens=tokens[batch:],
                                    rpo_alpha=weights[-1])
    assert float(loss) == pytest.approx(float(expected), rel=1e-9, abs=1e-12)
    assert float(metrics["reward_margin"]) == pytest.approx(trl_metrics["rewards/margins"][-1], rel=1e-9)
    assert float(metrics["reward_accuracy"]) == pytest.approx(trl_metrics["rewards/accuracies"][-1])
    assert float(metrics["chosen_logp"]) == pytest.approx(trl_metrics["logps/chosen"][-1], rel=1e-9)


def test_loss_is_ln2_when_the_policy_is_the_reference_and_gradients_favour_the_chosen_report():
    policy = torch.tensor([-12.0, -30.5, -4.0], requires_grad=True)
    rejected = torch.tensor([-10.0, -31.0, -9.0], requires_grad=True)
    loss, metrics = preference_loss(policy, rejected, policy.detach(), rejected.detach(), beta=0.1)
    assert float(loss.detach()) == pytest.approx(math.log(2))
    assert float(metrics["reward_margin"]) == 0 and float(metrics["kl"]) == 0
    loss.backward()
    assert (policy.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    ipo, _ = preference_loss(policy, rejected, policy.detach(), rejected.detach(), beta=0.1, kind="ipo",
                             chosen_tokens=torch.tensor([3, 5, 2]), rejected_tokens=torch.tensor([4, 4, 4]))
    assert float(ipo.detach()) == pytest.approx((1 / (2 * 0.1)) ** 2)
    with pytest.raises(ValueError, match="token counts"):
        preference_loss(policy, rejected, policy, rejected, beta=0.1, kind="ipo")

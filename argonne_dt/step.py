"""One optimizer step: the objective over the micro-batches, a global-norm clip, AdamW.

The trainer, the benchmarks and the equality tests all run this step, so what is measured and
proven is what trains. It needs no data pipeline (the GPU check imports it on a bare torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from .distributed import ParallelLayout, full_value
from .loss import loss_context, next_token_loss
from .optim import clip_grad_norm_

Objective = Callable[[torch.nn.Module, dict, torch.device], dict[str, torch.Tensor]]


@dataclass
class StepResult:
    """Each objective term averaged over micro-batches and dp ranks (the same on every rank),
    the gradient norm before clipping, and whether the update was applied (all finite)."""

    losses: dict[str, float]
    grad_norm: float
    applied: bool

    @property
    def loss(self) -> float:
        return self.losses["loss"]


def accumulate_gradients(model, micro_batches: list[dict], device: torch.device, autocast,
                         layout: ParallelLayout | None, objective: Objective = next_token_loss) -> dict[str, torch.Tensor]:
    """Forward + backward of ``objective`` over the micro-batches; returns this rank's terms
    averaged over them (``loss`` is the one differentiated). ``layout`` is the model's (None: one device).

    Under FSDP2 the gradients are reduce-scattered once, after the last micro-batch: the earlier
    ones accumulate in the unsharded gradients.
    """
    sums: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(index == len(micro_batches) - 1)
        with autocast, loss_context(layout):
            terms = {name: value / len(micro_batches) for name, value in objective(model, batch, device).items()}
            terms["loss"].backward()
        for name, value in terms.items():
            value = full_value(value.detach())
            sums[name] = sums[name] + value if name in sums else value
    return sums


def train_step(model, optimizer, micro_batches: list[dict], device: torch.device, autocast, grad_clip: float,
               layout: ParallelLayout | None, objective: Objective = next_token_loss) -> StepResult:
    """Gradients of the micro-batches, global-norm clip, optimizer step unless non-finite.

    Every rank gets the same numbers, so all take the same decision.
    """
    sums = accumulate_gradients(model, micro_batches, device, autocast, layout, objective)
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip)
    totals = torch.stack(list(sums.values()))
    dp = 1
    if layout is not None and layout.dp_group is not None:
        # The ranks of a tp group hold the same terms (one batch): the mean over the dp group is everyone's.
        dist.all_reduce(totals, group=layout.dp_group)
        dp = layout.dp
    # The step's one wait for the device: its terms and gradient norm read together.
    *totals, grad_norm = torch.cat([totals, grad_norm.reshape(1).to(totals.dtype)]).tolist()
    losses = {name: total / dp for name, total in zip(sums, totals)}
    applied = all(math.isfinite(v) for v in losses.values()) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(losses, grad_norm, applied)

"""AdamW with weight-decay groups, warmup + cosine schedule, and global gradient-norm clipping."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from .config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norm weights (the 1-D parameters) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    # fused AdamW runs on CUDA and CPU; elsewhere fall back to foreach.
    fused = cfg.fused and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, cosine to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, start_step: int = 0):
    """The schedule of ``cfg``, positioned at optimizer step ``start_step`` (a resumed run's step).

    The schedule is a function of the step and the config alone, so a resumed run follows the
    config it is started with, also when that changed the learning rate or the warmup.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, total_steps) / cfg.lr,
                                             last_epoch=start_step - 1)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient across every shard and rank.

    With DTensor gradients ``get_total_norm`` returns a DTensor whose placements carry the pending
    reduction; ``full_tensor()`` performs it, so every rank sees the same global norm.

    Gradients that are still a pending sum (``Partial``: the sequence-parallel norm weights') are
    scaled one by one: torch 2.11's ``_foreach_mul_`` all-reduces a copy of them, scales the copy and
    leaves the gradients unclipped. ``mul_`` scales each rank's part (a sum scales with its terms).
    """
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        pending = [_is_pending_sum(p.grad) for p in parameters]
        torch.nn.utils.clip_grads_with_norm_([p for p, sum_ in zip(parameters, pending) if not sum_], max_norm, total,
                                             foreach=True)
        torch.nn.utils.clip_grads_with_norm_([p for p, sum_ in zip(parameters, pending) if sum_], max_norm, total,
                                             foreach=False)
    return total


def _is_pending_sum(grad: torch.Tensor) -> bool:
    return isinstance(grad, DTensor) and any(isinstance(p, Partial) for p in grad.placements)

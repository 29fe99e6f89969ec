"""Clipping the gradients of sequence-parallel norm weights, against one device.

Under sequence parallelism a norm weight's gradient stays a pending sum over the tp ranks
(``Partial``) until the optimizer reads it; clipping must scale it like every other gradient
(torch 2.11's ``_foreach_mul_`` left such gradients unscaled).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial

from argonne_dt.config import ModelConfig, ParallelConfig
from argonne_dt.optim import clip_grad_norm_
from argonne_dt.parallelize import build_model
from argonne_dt.step import accumulate_gradients
from helpers.processes import run_distributed

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=16)
MICRO_BATCHES, BATCH, SEQ = 2, 2, 8


def _micro_batches() -> list[dict]:
    windows = torch.randint(0, MODEL.vocab_size, (MICRO_BATCHES, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return [{"input": w[:, :-1], "target": w[:, 1:]} for w in windows]


def _clipped_gradients(tp: int, max_norm_of_norm: float) -> dict:
    """Gradients of two accumulated micro-batches, clipped to ``max_norm_of_norm`` x their norm (fp32)."""
    from argonne_dt.distributed import build_layout

    layout = build_layout(ParallelConfig(tp=tp, dp=1, sequence_parallel=True), "cpu") if tp > 1 else None
    model = build_model(MODEL, layout, seed=0)
    accumulate_gradients(model, _micro_batches(), torch.device("cpu"), contextlib.nullcontext(), layout)
    pending = sorted(name for name, p in model.named_parameters()
                     if isinstance(p.grad, DTensor) and any(isinstance(x, Partial) for x in p.grad.placements))
    norm = clip_grad_norm_(model.parameters(), max_norm=float("inf")).item()
    clip_grad_norm_(model.parameters(), max_norm=max_norm_of_norm * norm)
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for name, p in model.named_parameters()}
    return {"norm": norm, "grads": grads, "pending": pending}


def test_clipped_sequence_parallel_norm_gradients_equal_one_device():
    tp2 = run_distributed(_clipped_gradients, 2, 2, 0.25)[0]
    one = _clipped_gradients(1, 0.25)
    # What this test is about: the norm weights' gradients are pending sums when clipped.
    assert tp2["pending"] == sorted(name for name in one["grads"] if "norm" in name)
    assert tp2["norm"] == pytest.approx(one["norm"], rel=1e-5)
    for name, reference in one["grads"].items():
        # fp32 sums in another order: ~1e-7 apart; an unclipped gradient is 4x its reference.
        error = ((tp2["grads"][name] - reference).norm() / reference.norm()).item()
        assert error < 1e-4, (name, error)

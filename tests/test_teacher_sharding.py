"""A teacher sharded by FSDP2 (``distill.teacher_fsdp``) stays sharded through training, as the
planner counts it; the distillation terms a dp 2 step reports are one device's over the global batch."""

from __future__ import annotations

import contextlib

import pytest
import torch

from argonne_dt.config import ParallelConfig
from argonne_dt.parallelize import build_model
from helpers.processes import run_distributed
from helpers.teachers import batch_of, reference, student_config

pytestmark = pytest.mark.distributed

ALPHA, TEMPERATURE, ROWS = 0.4, 2.0, 4


def _teacher_local_elements(teacher) -> int:
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in teacher.parameters())


def _blocks_sharded(teacher) -> bool:
    """Every block parameter is a DTensor sharded over dp (FSDP2's resting state)."""
    from torch.distributed.tensor import DTensor, Shard

    return all(isinstance(p, DTensor) and p.placements == (Shard(0),)
               for block in teacher.layers for p in block.parameters())


def _distillation_steps(teacher_dir: str) -> dict:
    """Two training steps at dp 2 (FSDP2 student, FSDP2-sharded teacher) through the trainer's step."""
    from argonne_dt.distill import DistillationObjective, load_teacher
    from argonne_dt.distributed import build_layout
    from argonne_dt.optim import build_optimizer
    from argonne_dt.step import train_step

    cfg = student_config(teacher_dir, alpha=ALPHA, temperature=TEMPERATURE, chunk_tokens=5, teacher_fsdp=True)
    cfg.parallel = ParallelConfig(tp=1)
    layout = build_layout(cfg.parallel, "cpu")
    student = build_model(cfg.model, layout, "cpu", seed=4)
    teacher = load_teacher(cfg, layout, torch.device("cpu"))
    optimizer = build_optimizer(student, cfg.optim, "cpu")
    objective = DistillationObjective(teacher, cfg.distill, torch.device("cpu"))
    out = {"before": (_blocks_sharded(teacher), _teacher_local_elements(teacher)), "steps": []}
    for seed in (5, 6):
        local = {k: v.chunk(layout.dp)[layout.dp_rank] for k, v in batch_of(ROWS, seed=seed).items()}
        result = train_step(student, optimizer, [local], torch.device("cpu"), contextlib.nullcontext(),
                            cfg.optim.grad_clip, layout, objective)
        out["steps"].append({"losses": result.losses, "sharded": _blocks_sharded(teacher),
                             "local_elements": _teacher_local_elements(teacher)})
    return out


@pytest.fixture(scope="module")
def per_rank(teacher_dir) -> list[dict]:
    return run_distributed(_distillation_steps, 2, teacher_dir, timeout_s=300)


def test_an_fsdp_teacher_stays_sharded_after_its_forward_as_the_planner_counts(per_rank, teacher_dir):
    from argonne_dt.distill import hf_teacher_config
    from argonne_dt.memory_plan import local_parameter_count
    from pathlib import Path

    cfg = student_config(teacher_dir, teacher_fsdp=True)
    teacher_model, _ = hf_teacher_config(Path(teacher_dir), cfg)
    planned = local_parameter_count(teacher_model, ParallelConfig(tp=1), tp=1, dp=2, shard_root=False)
    rank0 = per_rank[0]
    assert rank0["before"] == (True, planned)
    for step in rank0["steps"]:
        assert step["sharded"], "a teacher block holds gathered parameters after the forward"
        assert step["local_elements"] == planned


def test_dp2_distillation_terms_are_one_devices_over_the_global_batch(per_rank, teacher_dir):
    """Every rank reports the same loss, CE and KL: one device's over both ranks' rows (step 1,
    before any update)."""
    cfg = student_config(teacher_dir, alpha=ALPHA, temperature=TEMPERATURE)
    expected, _ = reference(build_model(cfg.model, None, "cpu", seed=4), teacher_dir, batch_of(ROWS, seed=5),
                            ALPHA, TEMPERATURE)
    assert per_rank[0]["steps"][0]["losses"] == per_rank[1]["steps"][0]["losses"]
    assert per_rank[0]["steps"][1]["losses"] == per_rank[1]["steps"][1]["losses"]
    for key in ("loss", "ce", "kl"):
        got = per_rank[0]["steps"][0]["losses"][key]
        assert abs(got - expected[key]) <= 1e-5 * max(1.0, abs(expected[key])), (key, got, expected[key])

"""The training job on a dp 2 x tp 2 grid (FSDP2 and TP on 4 gloo ranks): a preempted and resumed run
equals the uninterrupted one bit for bit, a log line every 2 steps is the mean of its steps, and files of
one row group each serve training and validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers.processes import run_distributed
from helpers.runs import make_config, model_tensors, sigterm_after_step, train_in_process

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]


def _run_grid_jobs(tmp: str, corpus: str) -> dict:
    """dp 2 x tp 2: uninterrupted vs preempted + resumed."""
    grid = {"parallel.tp": 2, "parallel.dp": 2, "train.grad_accum_steps": 2, "train.steps": 4}
    single = f"{corpus}-single-row-group"
    return {
        "full": train_in_process(make_config(f"{tmp}/grid_full", corpus, **grid, **{"metrics.log_every": 2})),
        "first": train_in_process(make_config(f"{tmp}/grid_resumed", corpus, **grid),
                                  on_step=sigterm_after_step(2)),
        "second": train_in_process(make_config(f"{tmp}/grid_resumed", corpus, **grid)),
        # Files of one row group each, for training and for validation, at dp 2.
        "single_row_groups": train_in_process(make_config(f"{tmp}/grid_single", single, **{
            **grid, "train.steps": 2, "data.eval_paths": f"{single}/part-2.parquet", "train.eval_every": 2,
            "train.eval_batches": 2})),
    }


def test_dp2_tp2_preempted_and_resumed_equals_uninterrupted(tmp_path, corpus):
    per_rank = run_distributed(_run_grid_jobs, 4, str(tmp_path), corpus)
    for r in per_rank:
        assert r["first"]["status"] == "preempted"
        assert {**r["first"]["losses"], **r["second"]["losses"]} == r["full"]["losses"]
        assert r["single_row_groups"]["status"] == "completed"
    records = [json.loads(line) for line in (tmp_path / "grid_single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2]
    # Logged every 2 steps: each line is the mean of its 2 steps (each step: 2 micro-batches x 2 dp ranks).
    losses = per_rank[0]["full"]["losses"]
    logged = {r["step"]: r for r in map(json.loads, (tmp_path / "grid_full" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(logged) == [2, 4]
    for step in (2, 4):
        assert math.isclose(logged[step]["loss"], (losses[step - 1] + losses[step]) / 2, rel_tol=1e-12)
        assert logged[step]["grad_norm_max"] >= logged[step]["grad_norm"]
    full = model_tensors(Path(per_rank[0]["full"]["checkpoint"]))
    resumed = model_tensors(Path(per_rank[0]["second"]["checkpoint"]))
    assert all(torch.equal(full[k], resumed[k]) for k in full)

"""The state a run is made of, checked directly at dp 2 (FSDP2) and tp 2 on gloo: the logged losses
are one device's over the global batch, and a resume restores the RNG, the optimizer moments and the
log window exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from argonne_dt.parallelize import build_model
from helpers.processes import run_distributed
from helpers.runs import make_config

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]

STEPS, PREEMPTED_AT = 4, 3
# dp 2 x tp 1: FSDP2; held-out loss every 2 steps; a log line every 2 steps, so that the line after
# the resume at step 3 covers a step before the checkpoint.
SETTINGS = {"parallel.dp": 2, "parallel.tp": 1, "train.steps": STEPS, "metrics.log_every": 2,
            "train.eval_every": 2, "train.eval_batches": 2}


def _drawing_hook(states: dict, stop_at: int | None = None, records: dict | None = None):
    """on_step: draws random numbers (as dropout would; training itself draws none, so a generator
    left unrestored would go unseen) and records the generator's state (and the step's record);
    rank 0 is preempted at ``stop_at``."""
    import torch.distributed as dist

    def hook(step, record):
        torch.rand(5)
        states[step] = torch.get_rng_state()
        if records is not None:
            records[step] = dict(record)
        if step == stop_at and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _recording(module, name: str, seen: list):
    """Replace ``module.name`` by a wrapper recording the batches it is given (returns the undo)."""
    real = getattr(module, name)

    def wrapper(*args):
        batches = args[2] if name == "train_step" else [args[1]]
        seen.append([{k: b[k].clone() for k in ("input", "target")} for b in batches])
        return real(*args)

    setattr(module, name, wrapper)
    return lambda: setattr(module, name, real)


def _runs(tmp: str, corpus_dir: str) -> dict:
    """Uninterrupted (recording the batches trained and evaluated on) and preempted + resumed, at dp 2."""
    from argonne_dt import evaluation, trainer

    settings = {**SETTINGS, "data.eval_paths": f"{corpus_dir}-heldout"}
    out = {"states": {}, "resumed_states": {}, "records": {}}
    trained, evaluated = [], []
    undo = [_recording(trainer, "train_step", trained), _recording(evaluation, "next_token_loss", evaluated)]
    try:
        out["full"] = trainer.train(make_config(f"{tmp}/full", corpus_dir, **settings),
                                    _drawing_hook(out["states"], records=out["records"]))
    finally:
        for restore in undo:
            restore()
    out["trained"], out["evaluated"] = trained, evaluated
    out["first"] = trainer.train(make_config(f"{tmp}/resumed", corpus_dir, **settings),
                                 _drawing_hook({}, stop_at=PREEMPTED_AT))
    resumed = trainer.Trainer(make_config(f"{tmp}/resumed", corpus_dir, **settings))
    out["state_after_resume"] = torch.get_rng_state()
    out["second"] = resumed.run(_drawing_hook(out["resumed_states"]))
    out["optimizer_round_trip"] = {name: _optimizer_round_trip(f"{tmp}/optimizer_{name}", mesh)
                                   for name, mesh in (("tp2", (1, 2)), ("dp2", (2, 1)))}
    return out


def _optimizer_round_trip(job_dir: str, mesh_shape: tuple[int, int]) -> dict:
    """AdamW state after 3 steps, saved and loaded into a fresh model and optimizer: every tensor
    of every parameter's state compared exactly, shard by shard."""
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh

    from argonne_dt.checkpoint import Checkpointer, ModelOptimizerState
    from argonne_dt.config import Config, ParallelConfig
    from argonne_dt.distributed import layout_of
    from argonne_dt.optim import build_optimizer
    from argonne_dt.step import train_step
    from helpers.models import odd_model_config

    cfg = Config()
    cfg.model = odd_model_config()
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
    layout = layout_of(mesh if mesh_shape[0] > 1 else mesh["tp"], ParallelConfig(tp=mesh_shape[1]))
    model = build_model(cfg.model, layout, "cpu", seed=3)
    optimizer = build_optimizer(model, cfg.optim, "cpu")  # fused AdamW, as by default
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 2 * layout.dp, 17), generator=torch.Generator().manual_seed(4))
    for rows in tokens:
        local = rows.chunk(layout.dp)[layout.dp_rank]
        train_step(model, optimizer, [{"input": local[:, :-1], "target": local[:, 1:]}], torch.device("cpu"),
                   contextlib.nullcontext(), 1.0, layout)
    saved = Checkpointer(job_dir, 0, False, ModelOptimizerState(model, optimizer), {}).save(3, cfg.to_dict())
    fresh = build_model(cfg.model, layout, "cpu")
    fresh_optimizer = build_optimizer(fresh, cfg.optim, "cpu")
    Checkpointer(job_dir, 0, False, ModelOptimizerState(fresh, fresh_optimizer), {}).restore(saved)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    compared = {}
    for (name, param), (_, loaded) in zip(model.named_parameters(), fresh.named_parameters()):
        before, after = optimizer.state[param], fresh_optimizer.state.get(loaded, {})
        compared[name] = {key: key in after and torch.equal(local(before[key]), local(after[key]))
                          for key in ("exp_avg", "exp_avg_sq", "step")}
    return compared


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("state")
    return tmp, run_distributed(_runs, 2, str(tmp), corpus, timeout_s=300)


def _global_cross_entropy(model, batches: list[dict]) -> float:
    """One device's mean next-token cross-entropy over all the batches at once."""
    inputs = torch.cat([b["input"] for b in batches])
    targets = torch.cat([b["target"] for b in batches])
    with torch.no_grad():
        return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten()).item()


def test_dp2_logged_step_and_held_out_losses_are_one_devices_over_the_global_batch(runs, corpus):
    from argonne_dt.inference import load_model

    tmp, per_rank = runs
    rank0, rank1 = (r["full"] for r in per_rank)
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == STEPS
    # Step 1 trains the seeded initial weights on both ranks' micro-batches.
    cfg = make_config("unused", corpus, **SETTINGS)
    initial = build_model(cfg.model, None, "cpu", seed=cfg.train.seed)
    step1 = per_rank[0]["trained"][0] + per_rank[1]["trained"][0]
    assert len(per_rank[0]["trained"][0]) == len(per_rank[1]["trained"][0]) >= 1
    expected = _global_cross_entropy(initial, step1)
    assert abs(rank0["losses"][1] - expected) <= 1e-5 * expected, (rank0["losses"][1], expected)
    # Held-out loss at step 2: the step-2 weights on both ranks' 2 held-out batches each.
    logged = [json.loads(line) for line in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    eval_loss = next(r["eval_loss"] for r in logged if r["step"] == 2 and "eval_loss" in r)
    assert per_rank[0]["records"][2]["eval_loss"] == per_rank[1]["records"][2]["eval_loss"] == eval_loss
    weights, _ = load_model(tmp / "full" / "checkpoints" / "step-00000002")
    held_out = [batch for r in per_rank for [batch] in r["evaluated"][:2]]
    assert len(held_out) == 4
    expected = _global_cross_entropy(weights, held_out)
    assert abs(eval_loss - expected) <= 1e-5 * expected, (eval_loss, expected)


def test_resume_restores_every_ranks_rng_state(runs):
    _, per_rank = runs
    assert not torch.equal(per_rank[0]["states"][STEPS], per_rank[1]["states"][STEPS])  # each rank its own
    for rank, r in enumerate(per_rank):
        assert torch.equal(r["state_after_resume"], r["states"][PREEMPTED_AT]), rank
        for step, state in r["resumed_states"].items():
            assert torch.equal(state, r["states"][step]), (rank, step)
        assert sorted(r["resumed_states"]) == list(range(PREEMPTED_AT + 1, STEPS + 1))


def test_the_first_line_after_a_resume_equals_the_uninterrupted_runs(runs):
    tmp, per_rank = runs
    assert per_rank[0]["first"]["status"] == "preempted" and per_rank[0]["second"]["status"] == "completed"

    def lines(run: str) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, (tmp / run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    full, resumed = lines("full"), lines("resumed")
    assert sorted(full) == sorted(resumed) == [2, 4]
    for step in (2, 4):  # step 4's line covers step 3 (before the checkpoint) and step 4
        for key in ("loss", "grad_norm", "grad_norm_max", "tokens_seen", "lr"):
            assert resumed[step][key] == full[step][key], (step, key)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_optimizer_state_round_trips_exactly(runs, layout):
    _, per_rank = runs
    for rank, r in enumerate(per_rank):
        compared = r["optimizer_round_trip"][layout]
        assert len(compared) == 20  # every parameter (tied embedding once), each with its state
        for name, equal in compared.items():
            assert all(equal.values()), (rank, name, equal)

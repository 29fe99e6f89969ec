"""The path users run by default, end to end: bf16 autocast, fused AdamW, the fused loss (tp 1) or the
vocab-parallel loss (tp > 1), FSDP2 when dp > 1.

At tp 2, dp 2 (FSDP) and dp 2 x tp 2: a preempted and resumed run equals the uninterrupted one
bit for bit, and the uninterrupted run agrees with one device trained on the same global batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from argonne_dt.model import ArgonneModel
from helpers.processes import run_distributed
from helpers.runs import make_config, model_tensors, sigterm_after_step, train_in_process

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]


STEPS = 3
LAYOUTS = {"tp2": {"parallel.tp": 2, "parallel.dp": 1}, "dp2": {"parallel.tp": 1, "parallel.dp": 2},
           "dp2_tp2": {"parallel.tp": 2, "parallel.dp": 2}}


def default_path(job_dir, corpus_dir, layout: dict):
    # eps near the gradient scale: Adam's update then depends on the gradient's size, not only its
    # sign, so a wrongly scaled gradient shows in the comparison with one device.
    return make_config(job_dir, corpus_dir, **layout, **{
        "train.dtype": "bf16", "optim.fused": True, "optim.eps": 1e-4, "train.steps": STEPS,
        "train.micro_batch_size": 1, "train.grad_accum_steps": 2, "checkpoint.every": 0})


def _recording_train(cfg, on_step=None) -> dict:
    """``train`` that also returns the micro-batches each step trained on."""
    from argonne_dt import trainer

    real_step, seen = trainer.train_step, []

    def recording_step(model, optimizer, micro_batches, *args):
        seen.append([{"input": b["input"].clone(), "target": b["target"].clone()} for b in micro_batches])
        return real_step(model, optimizer, micro_batches, *args)

    trainer.train_step = recording_step
    try:
        result = train_in_process(cfg, on_step)
    finally:
        trainer.train_step = real_step
    return {**result, "batches": seen}


def _layout_jobs(tmp: str, corpus_dir: str, names: list[str]) -> dict:
    out = {}
    for name in names:
        layout = LAYOUTS[name]
        full = _recording_train(default_path(f"{tmp}/{name}_full", corpus_dir, layout))
        first = train_in_process(default_path(f"{tmp}/{name}_resumed", corpus_dir, layout),
                                 on_step=sigterm_after_step(1))
        second = train_in_process(default_path(f"{tmp}/{name}_resumed", corpus_dir, layout))
        out[name] = {"full": full, "first": first, "second": second}
    return out


def _global_batches(per_rank: list[dict], name: str) -> list[list[dict]]:
    """Per step and micro-batch, the dp ranks' batches side by side (one tp rank per dp group)."""
    tp = LAYOUTS[name]["parallel.tp"]
    readers = [per_rank[rank][name]["full"]["batches"] for rank in range(0, len(per_rank), tp)]
    return [[{key: torch.cat([r[step][micro][key] for r in readers]) for key in ("input", "target")}
             for micro in range(len(readers[0][step]))] for step in range(len(readers[0]))]


def _one_device(tmp: str, corpus_dir: str, global_batches: dict) -> dict:
    """The same config on one device, trained with the trainer's own step on the recorded global batches."""
    from argonne_dt.distributed import DTYPES, mixed_precision
    from argonne_dt.optim import build_optimizer, build_scheduler
    from argonne_dt.parallelize import build_model
    from argonne_dt.step import train_step

    out = {}
    for name, steps in global_batches.items():
        cfg = default_path(f"{tmp}/{name}_one_device", corpus_dir, {"parallel.tp": 1, "parallel.dp": 1})
        device, dtype = torch.device("cpu"), DTYPES[cfg.train.dtype]
        model = build_model(cfg.model, None, device, cfg.train.seed, dtype)
        optimizer = build_optimizer(model, cfg.optim, "cpu")
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        losses = {}
        for step, micro_batches in enumerate(steps, 1):
            losses[step] = train_step(model, optimizer, micro_batches, device, mixed_precision(dtype, device),
                                      cfg.optim.grad_clip, None).loss
            scheduler.step()
        out[name] = {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "config": cfg.model, "seed": cfg.train.seed}
    return out


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory, corpus) -> dict:
    tmp = str(tmp_path_factory.mktemp("default_path"))
    two = run_distributed(_layout_jobs, 2, tmp, corpus, ["tp2", "dp2"], timeout_s=300)
    four = run_distributed(_layout_jobs, 4, tmp, corpus, ["dp2_tp2"], timeout_s=300)
    per_layout = {name: [r for r in two] for name in ("tp2", "dp2")}
    per_layout["dp2_tp2"] = four
    batches = {name: _global_batches(per_rank, name) for name, per_rank in per_layout.items()}
    reference = run_distributed(_one_device, 1, tmp, corpus, batches, timeout_s=300)[0]
    return {"per_layout": per_layout, "reference": reference}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_default_path_resumed_run_equals_uninterrupted_bit_for_bit(distributed_runs, name):
    per_rank = distributed_runs["per_layout"][name]
    for r in per_rank:
        runs = r[name]
        assert runs["first"]["status"] == "preempted" and runs["second"]["status"] == "completed"
        assert {**runs["first"]["losses"], **runs["second"]["losses"]} == runs["full"]["losses"]
    full = model_tensors(Path(per_rank[0][name]["full"]["checkpoint"]))
    resumed = model_tensors(Path(per_rank[0][name]["second"]["checkpoint"]))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_default_path_agrees_with_one_device_on_the_same_batches(distributed_runs, name):
    runs = distributed_runs["per_layout"][name][0][name]
    reference = distributed_runs["reference"][name]
    losses = runs["full"]["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        # bf16 matmuls summed in other orders: ~1e-3 apart; a wrong gradient or batch is far beyond.
        assert abs(loss - reference["losses"][step]) < 5e-3 * reference["losses"][step], (step, loss, reference["losses"])
    assert losses[STEPS] < losses[1]  # and it trains
    # The updates (trained - initial) agree to a few percent of their size (bf16 noise); a partial
    # gradient, a wrong batch or a lost shard moves some parameter's update by far more.
    initial = ArgonneModel(reference["config"])
    initial.init_weights(seed=reference["seed"])
    trained = model_tensors(Path(runs["full"]["checkpoint"]))
    errors = {}
    for param_name, start in initial.named_parameters():
        update, reference_update = trained[param_name] - start, reference["params"][param_name] - start
        errors[param_name] = ((update - reference_update).norm() / reference_update.norm()).item()
    worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst[1] < 0.1, worst

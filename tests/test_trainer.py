"""The training job on CPU / gloo: exact resume, preemption, kill -9 during a save, resharding, metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from argonne_dt.checkpoint import complete_checkpoints
from argonne_dt.optim import lr_at
from helpers.processes import run_distributed
from helpers.runs import STEPS, make_config, model_tensors, sigterm_after_step, train_in_process

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]


def _run_tp2_jobs(tmp: str, corpus: str) -> dict:
    """Uninterrupted, preempted + resumed, and a non-finite run, all TP 2 with grad accumulation 2."""
    out = {}
    accum = {"parallel.tp": 2, "train.grad_accum_steps": 2}
    extras = {"data.eval_paths": f"{corpus}-heldout", "train.eval_every": 3, "train.eval_batches": 2,
              "metrics.sample_every": 3, "metrics.sample_tokens": 4, "metrics.sample_prompts": "the model reads"}
    out["full"] = train_in_process(make_config(f"{tmp}/full", corpus, **accum, **extras))
    out["first"] = train_in_process(make_config(f"{tmp}/resumed", corpus, **accum), on_step=sigterm_after_step(3))
    out["second"] = train_in_process(make_config(f"{tmp}/resumed", corpus, **accum))
    out["changed"] = _resume_with_other_hyperparameters(tmp, corpus, accum)
    out["one_reader"] = _with_a_failing_reader_on_rank_1(tmp, corpus, accum)
    out["async"] = train_in_process(make_config(f"{tmp}/async", corpus, **accum, **{"checkpoint.async_save": True}))
    out["warm_start"] = train_in_process(make_config(f"{tmp}/warm", corpus, **accum, **{
        "checkpoint.initial_load_path": f"{tmp}/full", "train.steps": 1}))
    try:
        train_in_process(make_config(f"{tmp}/nan", corpus, **{
            "parallel.tp": 2, "optim.lr": 1e30, "optim.grad_clip": 0, "train.max_nonfinite_steps": 2,
            "checkpoint.every": 1}))
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        out["nan_error"] = f"{type(err).__name__}: {err}"
    return out


def _resume_with_other_hyperparameters(tmp: str, corpus: str, accum: dict) -> dict:
    """The finished run continued for 2 more steps with another lr, warmup and weight decay."""
    import torch.distributed as dist

    from argonne_dt import trainer

    if dist.get_rank() == 0:
        shutil.copytree(f"{tmp}/full/checkpoints", f"{tmp}/changed/checkpoints")
    dist.barrier()
    optimizers = []
    real_build = trainer.build_optimizer
    trainer.build_optimizer = lambda *args: optimizers.append(real_build(*args)) or optimizers[-1]
    lrs = {}
    try:
        cfg = make_config(f"{tmp}/changed", corpus, **accum, **{
            "train.steps": STEPS + 2, "optim.lr": 1.5e-3, "optim.min_lr": 1e-4, "optim.weight_decay": 0.05})
        result = train_in_process(cfg, on_step=lambda step, record: lrs.__setitem__(step, record["lr"]))
    finally:
        trainer.build_optimizer = real_build
    return {**result, "lrs": lrs, "weight_decays": [g["weight_decay"] for g in optimizers[0].param_groups],
            "expected_lrs": {s: lr_at(s - 1, cfg.optim, cfg.train.steps) for s in lrs}}


def _with_a_failing_reader_on_rank_1(tmp: str, corpus: str, accum: dict) -> dict:
    """Rank 1 cannot open any parquet file; the micro-batches each rank trained on are recorded."""
    import hashlib

    import torch.distributed as dist

    import pyarrow.parquet as pq

    from argonne_dt import trainer

    def failing_parquet_file(*args, **kwargs):
        raise OSError("stale NFS file handle")

    real_parquet_file, real_step = pq.ParquetFile, trainer.train_step
    seen = []

    def recording_step(model, optimizer, micro_batches, *args):
        seen.append([hashlib.sha256(b["input"].numpy().tobytes()).hexdigest() for b in micro_batches])
        return real_step(model, optimizer, micro_batches, *args)

    if dist.get_rank() == 1:
        pq.ParquetFile = failing_parquet_file
    trainer.train_step = recording_step
    try:
        result = train_in_process(make_config(f"{tmp}/one_reader", corpus, **accum,
                                              **{"train.steps": 2, "data.retry_backoff_s": 0}))
    finally:
        pq.ParquetFile, trainer.train_step = real_parquet_file, real_step
    return {**result, "batches": seen}


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("tp2")
    return tmp, run_distributed(_run_tp2_jobs, 2, str(tmp), corpus)


def test_preempted_and_resumed_run_equals_uninterrupted(tp2_runs):
    tmp, per_rank = tp2_runs
    for rank, r in enumerate(per_rank):
        assert r["full"]["status"] == "completed" and r["full"]["step"] == STEPS
        assert r["first"]["status"] == "preempted" and r["first"]["step"] == 3
        assert r["second"]["status"] == "completed" and r["second"]["step"] == STEPS
        resumed = {**r["first"]["losses"], **r["second"]["losses"]}
        assert resumed == r["full"]["losses"], rank  # bit-for-bit, step by step
        assert r["full"]["losses"][STEPS] < r["full"]["losses"][1]
    full = model_tensors(Path(per_rank[0]["full"]["checkpoint"]))
    resumed = model_tensors(Path(per_rank[0]["second"]["checkpoint"]))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_async_checkpoints_are_complete_and_training_unchanged(tp2_runs):
    tmp, per_rank = tp2_runs
    assert per_rank[0]["async"]["losses"] == per_rank[0]["full"]["losses"]
    kept = [p.name for p in complete_checkpoints(tmp / "async" / "checkpoints")]
    assert kept == ["step-00000004", "step-00000006"]
    full = model_tensors(Path(per_rank[0]["full"]["checkpoint"]))
    written = model_tensors(tmp / "async" / "checkpoints" / "step-00000006")
    assert all(torch.equal(full[k], written[k]) for k in full)


def test_initial_load_path_starts_from_another_runs_weights(tp2_runs):
    _, per_rank = tp2_runs
    full = per_rank[0]["full"]["losses"]
    warm = per_rank[0]["warm_start"]["losses"]
    # The first batch again, now seen by the trained weights: lower than at step 1 of the fresh run.
    assert warm[1] < full[1] - 0.1


def test_a_resumed_run_takes_the_new_optimizer_and_schedule_values(tp2_runs):
    _, per_rank = tp2_runs
    for r in per_rank:
        changed = r["changed"]
        assert changed["status"] == "completed" and sorted(changed["lrs"]) == [STEPS + 1, STEPS + 2]
        for step, lr in changed["lrs"].items():  # the new peak and total steps, not the stored ones
            assert math.isclose(lr, changed["expected_lrs"][step], rel_tol=1e-12)
        assert changed["weight_decays"] == [0.05, 0.0]


def test_one_rank_per_tp_group_reads_and_its_peers_train_on_the_same_batches(tp2_runs):
    _, per_rank = tp2_runs
    rank0, rank1 = (r["one_reader"] for r in per_rank)
    assert rank0["status"] == rank1["status"] == "completed"
    assert rank0["batches"] == rank1["batches"] and len(rank0["batches"]) == 2
    assert rank0["losses"] == {s: per_rank[0]["full"]["losses"][s] for s in (1, 2)}


def test_preemption_saved_at_the_step_boundary(tp2_runs):
    tmp, per_rank = tp2_runs
    assert per_rank[0]["first"]["checkpoint"].endswith("step-00000003")


def test_keep_last_and_metrics_files(tp2_runs):
    tmp, _ = tp2_runs
    kept = [p.name for p in complete_checkpoints(tmp / "full" / "checkpoints")]
    assert kept == ["step-00000004", "step-00000006"]
    records = [json.loads(line) for line in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    first = records[0]
    for key in ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "memory_gib"):
        assert key in first
    assert first["tokens_seen"] == 2 * 16 * 2  # micro-batch x seq_len x accumulation x dp 1
    assert list((tmp / "full" / "tb").glob("events.out.tfevents.*"))
    stored = json.loads((tmp / "full" / "checkpoints" / "step-00000006" / "config.json").read_text())
    assert stored["train"]["grad_accum_steps"] == 2 and stored["parallel"]["tp"] == 2


def test_non_finite_steps_are_skipped_then_stop_the_run(tp2_runs):
    tmp, per_rank = tp2_runs
    message = per_rank[0]["nan_error"]
    assert message.startswith("TrainingError: 3 consecutive steps with a non-finite loss or gradient norm")
    assert "train.max_nonfinite_steps=2" in message and "step-00000001" in message
    # No periodic save happens while updates are being skipped: the newest is the last good one.
    kept = complete_checkpoints(tmp / "nan" / "checkpoints")
    assert kept[-1].name == "step-00000001"
    assert all(torch.isfinite(t).all() for t in model_tensors(kept[-1]).values())


def test_tp2_checkpoint_resumes_under_tp1(tp2_runs, corpus, tmp_path):
    tmp, per_rank = tp2_runs
    source = str(tmp / "resumed" / "checkpoints" / "step-00000004")  # step 3 was pruned: keep_last 2
    # Use the step-4 checkpoint of the resumed run: the next step (5) must match.
    result = run_distributed(_resume_one_step_from, 1, str(tmp_path), corpus, source, 1)[0]
    assert math.isclose(result["losses"][5], per_rank[0]["full"]["losses"][5], rel_tol=1e-5)


def _resume_one_step_from(tmp: str, corpus: str, source: str, tp: int) -> dict:
    import torch.distributed as dist

    job = f"{tmp}/tp{tp}"
    if dist.get_rank() == 0:
        shutil.copytree(source, f"{job}/checkpoints/{Path(source).name}")
    dist.barrier()
    step = int(Path(source).name.split("-")[1])
    return train_in_process(make_config(job, corpus, **{"parallel.tp": tp, "train.grad_accum_steps": 2}),
                            on_step=sigterm_after_step(step + 1))


def test_tp2_checkpoint_resumes_under_tp4(tp2_runs, tmp_path, corpus):
    tmp, tp2 = tp2_runs
    source = str(tmp / "resumed" / "checkpoints" / "step-00000004")
    for r in run_distributed(_resume_one_step_from, 4, str(tmp_path), corpus, source, 4):
        assert math.isclose(r["losses"][5], tp2[0]["full"]["losses"][5], rel_tol=1e-5)


def _killed_during_save(tmp: str, corpus: str) -> None:
    """Rank 1 dies by SIGKILL while writing the step-4 checkpoint (after writing part of it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from argonne_dt import checkpoint

    real_save = dcp.save

    def dying_save(state, *, storage_writer, **kwargs):
        if "step-00000004" in str(storage_writer.path) and dist.get_rank() == 1:
            Path(storage_writer.path, "__1_0.distcp").write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(state, storage_writer=storage_writer, **kwargs)

    checkpoint.dcp.save = dying_save
    train_in_process(make_config(f"{tmp}/killed", corpus, **{"parallel.tp": 2, "train.grad_accum_steps": 2}))


def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, corpus, tp2_runs):
    _, tp2 = tp2_runs
    with pytest.raises(Exception):
        run_distributed(_killed_during_save, 2, str(tmp_path), corpus, timeout_s=20)
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-00000002"]
    assert (checkpoints / "step-00000004.tmp").exists()  # the interrupted save, never picked
    result = run_distributed(_resume_after_kill, 2, str(tmp_path), corpus)[0]
    assert not (checkpoints / "step-00000004.tmp").exists()
    assert result["status"] == "completed"
    assert result["losses"] == {s: tp2[0]["full"]["losses"][s] for s in range(3, STEPS + 1)}
    # Steps 3 and 4 were logged before the kill and again after the resume: each appears once.
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records if "loss" in r][2:] == [tp2[0]["full"]["losses"][s] for s in range(3, STEPS + 1)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "killed" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


def _resume_after_kill(tmp: str, corpus: str) -> dict:
    return train_in_process(make_config(f"{tmp}/killed", corpus, **{"parallel.tp": 2, "train.grad_accum_steps": 2}))


def test_samples_and_validation_are_logged_during_training(tp2_runs):
    tmp, _ = tp2_runs
    records = [json.loads(line) for line in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if "sample" in r]
    assert [r["step"] for r in samples] == [3, 6] and all(r["sample"].startswith("the model reads") for r in samples)
    evals = [r for r in records if "eval_loss" in r and "loss" not in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-9) for r in evals)


def test_validation_of_a_checkpoint_equals_the_direct_loss(tp2_runs, corpus):
    from dataclasses import replace

    from argonne_dt.inference import load_model
    from argonne_dt.data import batches_for
    from argonne_dt.evaluation import evaluate_checkpoint
    from argonne_dt.loss import cross_entropy_loss

    tmp, per_rank = tp2_runs
    checkpoint = per_rank[0]["full"]["checkpoint"]
    heldout = [f"{corpus}-heldout"]
    result = evaluate_checkpoint(checkpoint, heldout, max_batches=2, micro_batch_size=2)
    model, cfg = load_model(checkpoint)
    batches = iter(batches_for(replace(cfg.data, paths=heldout, loop=True), 2))
    with torch.no_grad():
        direct = sum(cross_entropy_loss(model(b["input"]), b["target"]).item() for b in (next(batches) for _ in range(2))) / 2
    assert math.isclose(result["loss"], direct, rel_tol=1e-6)
    # The trainer's own evaluation at step 6 (TP 2, same weights) agrees.
    records = [json.loads(line) for line in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["eval_loss"] for r in records if r.get("step") == 6 and "eval_loss" in r and "loss" not in r)
    assert math.isclose(logged, direct, rel_tol=1e-5)


def _generate(checkpoint: str) -> list[str]:
    from argonne_dt.generate import SamplingConfig, generate_from_checkpoint

    return generate_from_checkpoint(checkpoint, ["the model reads", "every rank"], SamplingConfig(8, temperature=0))


def test_tp2_checkpoint_generates_alike_on_one_process_and_under_tp2(tp2_runs):
    _, per_rank = tp2_runs
    checkpoint = per_rank[0]["full"]["checkpoint"]
    under_tp2 = run_distributed(_generate, 2, checkpoint)
    alone = _generate(checkpoint)
    assert under_tp2[0] == under_tp2[1] == alone
    assert all(text for text in alone)

"""A run continued on another number of dp ranks: the data, the batch and the schedule survive.

dp 2 x tp 2 -> dp 1 x tp 2 through the trainer: every document of the epoch is consumed exactly
once over the two runs. dp 2 -> dp 1 with ``train.global_batch_size``: the same tokens per step and
lr schedule as an uninterrupted dp 2 run, and losses close to it. (The dealing itself, dp 2 -> 1,
1 -> 2, 2 -> 3 and 3 -> 2, is proven on the loaders in test_data.py; under torchrun in test_launch.py.)
"""

from __future__ import annotations

from collections import Counter

import pytest

from helpers.documents import documents, write_parquet
from helpers.processes import run_distributed
from helpers.runs import make_config, sigterm_after_step, train_in_process

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]


def _epoch_settings(dp: int) -> dict:
    # No prefetching: what a saved position covers is exactly what the packer has taken.
    return {"parallel.tp": 2, "parallel.dp": dp, "data.loop": False, "data.prefetch": 0, "data.seq_len": 32,
            "train.steps": 1000, "checkpoint.every": 0, "metrics.log_every": 100}


def _taking_documents(job_dir: str, corpus_dir: str, dp: int, stop_at: int | None) -> dict:
    """Train until ``stop_at`` (SIGTERM) or the end of the data, recording the documents the packer took."""
    from argonne_dt.data import TokenPacker

    taken, real = [], TokenPacker._next_document

    def recording(self):
        doc = real(self)
        taken.append(tuple(doc))
        return doc

    TokenPacker._next_document = recording
    try:
        result = train_in_process(make_config(job_dir, corpus_dir, **_epoch_settings(dp)),
                                  on_step=sigterm_after_step(stop_at) if stop_at else None)
    finally:
        TokenPacker._next_document = real
    return {"status": result["status"], "step": result["step"], "taken": taken}


@pytest.fixture(scope="module")
def epoch_corpus(tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("epoch")
    texts = [f"file {n}: {text}" for n in range(3) for text in documents(8, seed=20 + n)]
    for n in range(3):
        write_parquet(root / f"part-{n}.parquet", texts[8 * n : 8 * n + 8], row_group_size=3)
    return str(root), texts


def test_dp2_tp2_to_dp1_tp2_consumes_every_document_of_the_epoch_once(tmp_path, epoch_corpus):
    from argonne_dt.config import DataConfig
    from argonne_dt.data import Position, QualityFilterTokenizer, TextBatch

    corpus_dir, texts = epoch_corpus
    job = str(tmp_path / "job")
    first = run_distributed(_taking_documents, 4, job, corpus_dir, 2, 3, timeout_s=300)
    second = run_distributed(_taking_documents, 2, job, corpus_dir, 1, None, timeout_s=300)
    assert [r["status"] for r in first] == ["preempted"] * 4 and first[0]["step"] == 3
    assert second[0]["status"] == "data_exhausted" and second[0]["step"] > 3
    # Only the first rank of each tp group reads: ranks 0 and 2 before, rank 0 after.
    assert first[1]["taken"] == first[3]["taken"] == second[1]["taken"] == []
    consumed = Counter(first[0]["taken"]) + Counter(first[2]["taken"]) + Counter(second[0]["taken"])
    epoch = QualityFilterTokenizer(DataConfig(min_tokens=1))(TextBatch(texts, Position(0))).docs
    assert consumed == Counter(map(tuple, epoch))


def _global_batch_jobs(tmp: str, corpus_dir: str, part: str) -> dict:
    """``part``: "full" and "first" at dp 2, "second" (the resume of "first") at dp 1."""
    records: dict[int, dict] = {}
    preempt = sigterm_after_step(3)

    def on_step(step: int, record: dict) -> None:
        records[step] = record
        if part == "first":
            preempt(step, record)

    settings = {"parallel.tp": 1, "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.steps": 6,
                "checkpoint.every": 0, "metrics.log_every": 1}
    job = f"{tmp}/{'full' if part == 'full' else 'resumed'}"
    result = train_in_process(make_config(job, corpus_dir, **settings), on_step=on_step)
    return {**result, "records": records}


def test_a_global_batch_keeps_tokens_per_step_and_schedule_from_dp2_to_dp1(tmp_path, corpus):
    tmp = str(tmp_path)
    full = run_distributed(_global_batch_jobs, 2, tmp, corpus, "full")[0]
    first = run_distributed(_global_batch_jobs, 2, tmp, corpus, "first")[0]
    second = run_distributed(_global_batch_jobs, 1, tmp, corpus, "second")[0]
    assert first["status"] == "preempted" and first["step"] == 3
    assert second["status"] == "completed" and second["step"] == 6 and sorted(second["records"]) == [4, 5, 6]
    resumed = {**first["records"], **second["records"]}
    for step in range(1, 7):
        # 4 sequences of 16 tokens a step: 2 dp ranks x 1 micro-batch of 2, then 1 rank x 2 micro-batches.
        assert resumed[step]["tokens_seen"] == full["records"][step]["tokens_seen"] == 64 * step
        assert resumed[step]["lr"] == full["records"][step]["lr"]
    assert all(first["records"][s]["loss"] == full["records"][s]["loss"] for s in (1, 2, 3))
    # After the resume the batches are the same documents dealt otherwise: close, not equal.
    for step in (4, 5, 6):
        assert abs(resumed[step]["loss"] - full["records"][step]["loss"]) < 0.015 * full["records"][step]["loss"]

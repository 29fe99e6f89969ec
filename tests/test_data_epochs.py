"""Epochs under ``data.loop``: a change of dp size when the ranks are in different epochs, a share
that keeps no document; held-out batches: fetched only when used, in step across dp ranks."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from argonne_dt.config import DataConfig
from argonne_dt.data import (
    DataError,
    ParquetDocumentReader,
    Position,
    QualityFilterTokenizer,
    TextBatch,
    batches_for,
    plan_shares,
    reshard_positions,
    share_loader,
)
from argonne_dt.evaluation import Evaluator, evaluate
from helpers.documents import WORDS, dp_layout, record_documents, write_parquet
from helpers.loaders import Resharding, packer_state


def config(**overrides) -> DataConfig:
    values = dict(seq_len=15, num_workers=1, prefetch=0, tokenize_batch_size=3, min_tokens=1, loop=True)
    values.update(overrides)
    return DataConfig(**values)


def _rows(segments) -> list[tuple]:
    return [(s.file, s.row_group, row) for s in segments for row in range(s.start, s.stop)]


def _saved(position: Position, pending=(), documents=0) -> dict:
    """A loader state as far as resharding reads it: the packer's and the reader's entries."""
    return {"packer": {"position": position, "pending": np.asarray(pending, dtype=np.int64), "dropped": {},
                       "documents": documents},
            "reader": {"bad_shards": []}}


def test_carryover_when_one_rank_has_wrapped_to_the_next_epoch(tmp_path):
    files = [write_parquet(tmp_path / "a.parquet", [f"doc {i}" for i in range(20)], row_group_size=4)]
    old = plan_shares(files, 2, config())
    ahead, behind = old.shares
    # Rank 0 has wrapped into epoch 1 (3 rows of it read); rank 1 is still in epoch 0, mid-segment.
    states = [_saved(Position(1, 0, 3, ahead[0]), pending=[7, 8]),
              _saved(Position(0, 1, 1, behind[1]), pending=[9])]
    owed = (_rows([replace(behind[1], start=behind[1].start + 1)] + list(behind[2:]))  # epoch 0
            + _rows([replace(ahead[0], start=ahead[0].start + 3)] + list(ahead[1:]))  # epoch 1
            + _rows(behind))  # epoch 1 of the rank that was behind
    [single] = reshard_positions(states, old, 1)
    assert single.epoch == 1 and _rows(single.carryover) == owed
    assert single.pending.tolist() == [7, 8, 9]
    three = reshard_positions(states, old, 3)
    assert [row for r in three for row in _rows(r.carryover)] == owed  # contiguous, in order
    assert max(len(_rows(r.carryover)) for r in three) - min(len(_rows(r.carryover)) for r in three) <= 1
    assert {r.epoch for r in three} == {1}


def _drifting_corpus(tmp_path) -> tuple[list[str], list[str]]:
    """Short documents first, long ones after: at dp 2 and 3 the first ranks pass through their
    shares several times while the last is still in its first epoch."""
    short = [f"s{i} {WORDS[i % len(WORDS)]}" for i in range(24)]
    long = [f"l{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(26)) for i in range(24)]
    return [write_parquet(tmp_path / "mixed.parquet", short + long, row_group_size=5)], short + long


@pytest.mark.parametrize("sizes", [(2, 1), (2, 3, 1)])
def test_a_change_of_dp_size_keeps_every_documents_reads_per_epoch(tmp_path, monkeypatch, sizes):
    """Equal batches per rank, unequal documents: the ranks drift into different epochs before
    each change. The last run reads until it starts the epoch after the newest saved one; by
    then every document has been taken exactly (newest epoch + 1) times, and every token of the
    documents taken was emitted once or is still packed."""
    files, texts = _drifting_corpus(tmp_path)
    cfg = config(paths=files)
    taken: list[tuple] = []  # (document, epoch it was taken in)
    record_documents(monkeypatch, lambda packer, doc: taken.append(
        (tuple(doc), packer._batch.positions[packer._doc_index - 1].epoch)))
    window = cfg.seq_len + 1
    runs = Resharding(cfg, sizes)
    emitted, newest, drifted = 0, 0, []
    for stage, rank, reader in runs:
        if stage and rank == 0:  # what the previous size saved
            epochs = [packer_state(state)["position"].epoch for state in runs.saved.values()]
            drifted.append(len(set(epochs)) > 1)
            newest = max(epochs)
        batches = iter(reader)
        if stage == len(sizes) - 1:  # to the first document of the epoch after the newest one any old rank reached
            before = len(taken)
            while not any(epoch > newest for _, epoch in taken[before:]):
                next(batches)
                emitted += window
        else:
            emitted += window * len(list(islice(batches, 40 if stage == 0 else 120)))
    states = runs.states
    assert all(drifted) and newest >= 2  # every change happened with ranks in different epochs
    epoch_docs = QualityFilterTokenizer(cfg)(TextBatch(texts, Position(0))).docs
    reads = Counter(doc for doc, epoch in taken if epoch <= newest)
    assert reads == Counter({tuple(doc): newest + 1 for doc in epoch_docs})
    pending = sum(len(packer_state(state)["pending"]) for state in states.values())
    assert sum(len(doc) for doc, _ in taken) == emitted + pending


@pytest.fixture
def bounded_passes(monkeypatch):
    """Without the check the pipeline would look for a document forever: stop it after ten passes."""
    real_next = ParquetDocumentReader.next

    def next_within_ten_passes(self):
        batch = real_next(self)
        assert batch.position.epoch <= 10, "ten passes over the share and still no error"
        return batch

    monkeypatch.setattr(ParquetDocumentReader, "next", next_within_ten_passes)


def test_a_share_the_filter_empties_fails_at_its_first_pass(tmp_path, bounded_passes):
    digits = ["1234567890 " * 8 + str(i) for i in range(6)]  # every one over the digit ratio
    files = [write_parquet(tmp_path / "digits.parquet", digits, row_group_size=4)]
    cfg = config(paths=files)
    with pytest.raises(DataError, match=r"digits.parquet.*6 documents.*digit_ratio: 6.*data.max_digit_ratio"):
        next(iter(batches_for(cfg, 1)))
    # One of two dp ranks: its share (the digits) fails, the other reads on.
    good = write_parquet(tmp_path / "words.parquet", [" ".join(WORDS)] * 6, row_group_size=4)
    mixed = plan_shares(files + [good], 2, cfg)
    with pytest.raises(DataError, match=r"dp rank 0.*digits.parquet"):
        next(iter(share_loader(cfg, 1, mixed, 0)))
    assert len(list(islice(iter(share_loader(cfg, 1, mixed, 1)), 30))) == 30


def test_a_share_emptied_after_a_dealt_remainder_fails_after_one_pass_of_its_own(tmp_path, bounded_passes):
    """A remainder dealt at a change of dp size that keeps documents, then a share that keeps none:
    the error comes at the end of the share's first whole pass."""
    words = [f"w{i} " + " ".join(WORDS) for i in range(6)]
    digits = ["1234567890 " * 8 + str(i) for i in range(6)]
    files = [write_parquet(tmp_path / "a.parquet", words + digits, row_group_size=3)]
    cfg = config(paths=files)
    old = plan_shares(files, 2, cfg)
    # Old rank 0 (the words) read nothing, old rank 1 (the digits) everything: the words are owed,
    # dealt to both new ranks; new rank 1's own share is the digits.
    states = [_saved(Position(0, 0, 0, old.shares[0][0])), _saved(Position(0, len(old.shares[1])))]
    resumption = reshard_positions(states, old, 2)[1]
    assert _rows(resumption.carryover) == [(files[0], 1, 0), (files[0], 1, 1), (files[0], 1, 2)]
    batches = iter(batches_for(cfg, 1, dp_layout(1, 2), resumption))
    next(batches)  # the dealt words
    with pytest.raises(DataError, match=r"dp rank 1: a whole pass over .*a.parquet kept no document"):
        list(islice(batches, 500))


def test_held_out_data_the_filter_empties_fails_the_evaluation(tmp_path, bounded_passes):
    digits = ["1234567890 " * 8 + str(i) for i in range(6)]
    files = [write_parquet(tmp_path / "held-out-digits.parquet", digits, row_group_size=4)]
    evaluator = Evaluator(config(paths=files), 1, 3, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    with pytest.raises(DataError, match=r"held-out-digits.parquet kept no document.*digit_ratio: 6"):
        evaluator(torch.nn.Module())  # fails before the model is called


def test_without_loop_a_share_the_filter_empties_fails_instead_of_ending(tmp_path):
    """data.loop false: the reader ends after one pass, before a next epoch could show the pass
    barren; the data must not just end (training would stop at step 0, an evaluation blame the amount
    of text)."""
    digits = ["1234567890 " * 8 + str(i) for i in range(6)]
    files = [write_parquet(tmp_path / "digits.parquet", digits, row_group_size=4)]
    cfg = config(paths=files, loop=False)
    with pytest.raises(DataError, match=r"dp rank 0: a whole pass over .*digits.parquet kept no document.*digit_ratio: 6"):
        next(iter(batches_for(cfg, 1)))
    evaluator = Evaluator(cfg, 1, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False))  # loop false: all
    with pytest.raises(DataError, match=r"digits.parquet kept no document.*digit_ratio: 6"):
        evaluator(torch.nn.Module())
    # A pass that keeps a document still ends quietly: the end of the data.
    words = write_parquet(tmp_path / "words.parquet", [" ".join(WORDS)] + digits, row_group_size=4)
    assert len(list(batches_for(config(paths=[words], loop=False), 1))) > 0


class _MeanOfInputs(torch.nn.Module):
    """A stand-in model whose loss is the mean input id: which batches it saw shows in the loss."""

    config = SimpleNamespace(vocab_size=8)  # what the objective checks the targets against

    def forward(self, input, targets):
        return input.float().mean()


def _held_out(count: int, fetched: list, fail_at: int | None = None):
    """Batches of constant ids 0, 1, ...; each fetch recorded; an error at batch ``fail_at``."""
    for index in range(count):
        if index == fail_at:
            raise UnicodeError("rank 1 met undecodable bytes")
        fetched.append(index)
        yield {"input": torch.full((1, 4), float(index)), "target": torch.zeros(1, 4, dtype=torch.long)}


def test_an_evaluation_fetches_only_the_batches_it_uses():
    fetched = []
    result = evaluate(_MeanOfInputs(), _held_out(10, fetched), torch.device("cpu"),
                      torch.autocast("cpu", enabled=False), max_batches=3)
    assert fetched == [0, 1, 2] and result["loss"] == 1.0


def _evaluate_uneven_and_failing() -> dict:
    """Two dp ranks: rank 0 has 3 held-out batches, rank 1 has 5; then rank 1's data fails."""
    import torch.distributed as dist

    rank, fetched = dist.get_rank(), []
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    out = {"uneven": evaluate(_MeanOfInputs(), _held_out(3 + 2 * rank, fetched), cpu, off), "fetched": list(fetched)}
    try:
        evaluate(_MeanOfInputs(), _held_out(5, [], fail_at=2 if rank == 1 else None), cpu, off)
    except Exception as err:
        out["error"] = (type(err).__name__, str(err))
    return out


@pytest.mark.distributed
def test_held_out_ranks_stop_together_and_fail_together():
    from helpers.processes import run_distributed

    first, second = run_distributed(_evaluate_uneven_and_failing, 2)
    # Both ranks evaluate the 3 batches rank 0 has (mean input (0 + 1 + 2) / 3 on both).
    assert first["uneven"] == second["uneven"] and first["uneven"]["loss"] == 1.0
    assert first["fetched"] == [0, 1, 2] and second["fetched"][:3] == [0, 1, 2]
    assert second["error"] == ("UnicodeError", "rank 1 met undecodable bytes")
    assert first["error"] == ("DataError", "the held-out data of rank 1 failed: UnicodeError: rank 1 met undecodable bytes")

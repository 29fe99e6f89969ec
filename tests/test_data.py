"""The loader: file order, BOS/EOS packing and the shift, the quality filter, exact resume (also
mid-document), dp shares that are disjoint and complete, epochs, a change of dp size dealing the rest of
the epoch, fsspec URLs, the held-out files. Bad data: test_data_errors.py."""

import logging
import random
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from argonne_dt.data import (DataError, Position, QualityFilterTokenizer, TextBatch, expand_paths,
                             plan_shares)
from argonne_dt.tokenizer import load_tokenizer
from helpers.documents import WORDS, documents, record_documents, write_parquet
from helpers.loaders import Resharding, batches, loader_config, loader_of, rank_texts, reader_of, state_pending


def test_natural_order_of_files(shards, tmp_path):
    files = expand_paths([str(tmp_path / "*.parquet")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-2.parquet", "part-3.parquet", "part-10.parquet"]
    assert expand_paths([str(tmp_path)]) == files
    with pytest.raises(DataError, match="matches no file"):
        expand_paths([str(tmp_path / "nothing-*.parquet")])


def test_bos_eos_packing_and_shift(shards, tmp_path):
    files, docs = shards
    cfg = loader_config(loop=False)
    tok = load_tokenizer("qwen2.5")
    bos, eos = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ordered = docs[:40] + docs[40:65] + docs[65:]  # natural file order: part-2, part-3, part-10
    stream = []
    for text in ordered:
        stream += [bos] + tok(text, add_special_tokens=False)["input_ids"] + [eos]
    got = batches(loader_of(cfg, 2, expand_paths([str(tmp_path)])), 10_000)
    windows = [torch.cat([b["input"], b["target"][:, -1:]], dim=1) for b in got]
    flat = torch.cat(windows).reshape(-1).tolist()
    window = cfg.seq_len + 1
    # Every document is there, in order, cut into windows of seq_len + 1; only the tail is lost.
    assert len(flat) == (len(stream) // (2 * window)) * 2 * window
    assert flat == stream[: len(flat)]
    for b in got:
        assert b["input"].shape == b["target"].shape == (2, cfg.seq_len)
        assert torch.equal(b["input"][:, 1:], b["target"][:, :-1])
    assert got[-1]["documents"] <= len(docs)


def test_quality_filter_rules_and_counts():
    cfg = loader_config(min_tokens=10)
    f = QualityFilterTokenizer(cfg)
    digits = "1234567890 " * 10
    symbols = "#$%&*(){}[]<>|~^" * 5 + "abc"
    short_digits = "12345678901234567890"  # <= 50 chars: ratio rules do not apply
    assert f.rejects(None) == f.rejects("") == f.rejects(" \n\t ") == "empty"
    assert f.rejects(digits) == "digit_ratio"
    assert f.rejects(symbols) == "alpha_space_ratio"
    assert f.rejects(short_digits) is None
    good = " ".join(WORDS)
    out = f(TextBatch([None, "", digits, symbols, short_digits, "too short", good], Position(0)))
    # Qwen splits digits one per token: the short digit string has 20 tokens and stays.
    assert out.dropped == {"empty": 2, "digit_ratio": 1, "alpha_space_ratio": 1, "too_few_tokens": 1}
    assert len(out.docs) == 2 and all(d[0] == 151644 and d[-1] == 151645 for d in out.docs)
    no_markers = QualityFilterTokenizer(loader_config(add_bos=False, add_eos=False, min_tokens=1))(TextBatch([good], Position(0)))
    assert no_markers.docs[0] == load_tokenizer("qwen2.5")(good, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("cut", [1, 4, 9, 23])
def test_exact_resume_with_prefetch_and_parallel_tokenization(shards, cut):
    files, _ = shards
    cfg = loader_config(loop=True)  # 23 batches of 2 x 32 tokens cross an epoch boundary
    uninterrupted = batches(loader_of(cfg, 2, files), cut + 12)
    first = loader_of(cfg, 2, files)
    it = iter(first)
    for _ in range(cut):
        next(it)
    state = first.state_dict()
    resumed = loader_of(cfg, 2, files)
    resumed.load_state_dict(state)
    after = batches(resumed, 12)
    for expected, got in zip(uninterrupted[cut:], after):
        assert torch.equal(expected["input"], got["input"]) and torch.equal(expected["target"], got["target"])
        assert expected["dropped"] == got["dropped"] and expected["documents"] == got["documents"]


def test_resume_mid_document_with_long_documents(tmp_path):
    long_docs = [" ".join(documents(1, seed=s)[0] for _ in range(6)) for s in range(4)]
    files = [write_parquet(tmp_path / "long.parquet", long_docs, row_group_size=2)]
    cfg = loader_config(seq_len=15, loop=True)
    reference = batches(loader_of(cfg, 1, files), 40)
    loader = loader_of(cfg, 1, files)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    assert len(state_pending(state)) > 0  # really mid-document
    again = loader_of(cfg, 1, files)
    again.load_state_dict(state)
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(reference[7:], batches(again, 33)))


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_dp_shares_are_disjoint_and_complete(shards, dp_size):
    files, docs = shards
    shares = [rank_texts(files, rank, dp_size) for rank in range(dp_size)]
    together = [t for share in shares for t in share]
    assert sorted(together) == sorted(docs) and len(together) == len(set(together))
    if dp_size > 1:
        assert all(share for share in shares)


def test_tp_ranks_of_one_dp_group_get_identical_batches(shards):
    files, _ = shards
    a, b = (batches(loader_of(loader_config(), 2, files, dp_rank=1, dp_size=2), 6) for _ in range(2))
    assert all(torch.equal(x["input"], y["input"]) for x, y in zip(a, b))


def test_resume_with_another_dp_size_fails_clearly(shards):
    files, _ = shards
    loader = loader_of(loader_config(), 2, files, dp_rank=0, dp_size=2)
    batches(loader, 2)
    state = loader.state_dict()
    other = loader_of(loader_config(), 2, files, dp_rank=0, dp_size=3)
    other.load_state_dict(state)
    with pytest.raises(DataError, match="saved by dp rank 0 of 2, now dp rank 0 of 3"):
        next(iter(other))


def test_epochs_loop_or_stop(shards):
    files, docs = shards
    one_pass = rank_texts(files, 0, 1)
    reader = reader_of(files, loop=True, on_bad_shard="error")
    texts = [t for batch in islice(reader, 60) for t in batch.texts]  # 26 batches an epoch
    assert texts[: len(docs)] == one_pass and texts[len(docs) : 2 * len(docs)] == one_pass
    assert reader.get_state()["epoch"] >= 1


@pytest.mark.slow
def test_a_10mb_document_streams_into_windows(tmp_path):
    rng = random.Random(0)
    huge = " ".join(rng.choice(WORDS) for _ in range(1_900_000))
    assert len(huge) > 10_000_000
    path = write_parquet(tmp_path / "huge.parquet", [huge, "a small second document of text"], row_group_size=1)
    loader = loader_of(loader_config(seq_len=4095, loop=False, prefetch=1), 4, [path])
    first = batches(loader, 3)
    assert [b["input"].shape for b in first] == [(4, 4095)] * 3
    assert first[0]["input"][0, 0].item() == 151644  # BOS of the big document
    state = loader.state_dict()
    assert len(state_pending(state)) > 1_000_000  # the rest of the document waits, packed lazily


def test_fsspec_urls_are_listed_and_streamed(shards, tmp_path):
    files, docs = shards
    urls = expand_paths([f"file://{tmp_path}/*.parquet"])
    assert [u.rsplit("/", 1)[1] for u in urls] == ["part-2.parquet", "part-3.parquet", "part-10.parquet"]
    assert all(u.startswith("file://") for u in urls)
    assert expand_paths([f"file://{tmp_path}"]) == urls
    assert sorted(rank_texts(urls, 0, 1)) == sorted(docs)


def test_resume_with_other_files_fails_clearly(shards, tmp_path):
    files, _ = shards
    loader = loader_of(loader_config(), 2, files)
    batches(loader, 5)
    state = loader.state_dict()
    other = loader_of(loader_config(), 2, list(reversed(files)))
    other.load_state_dict(state)
    with pytest.raises(DataError, match=r"the data position points into .*part-\d+.parquet .* data.paths and data.eval_split now give other rows"):
        next(iter(other))


@pytest.mark.parametrize("dp_size", [2, 3])
def test_files_of_one_row_group_are_shared_evenly(tmp_path, dp_size):
    docs = documents(300, seed=4)
    files = [write_parquet(tmp_path / f"part-{i}.parquet", docs[i * 100 : (i + 1) * 100], row_group_size=100)
             for i in range(3)]
    shares = [rank_texts(files, rank, dp_size) for rank in range(dp_size)]
    together = [t for share in shares for t in share]
    assert sorted(together) == sorted(docs) and len(set(together)) == len(docs)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # split by rows, not whole row groups
    held_out = [write_parquet(tmp_path / "held-out.parquet", documents(20, seed=8), row_group_size=20)]
    for rank in range(dp_size):  # a single small held-out file still gives every rank batches
        loader = loader_of(loader_config(seq_len=15), 2, held_out, rank, dp_size)
        assert len(batches(loader, 3)) == 3


def test_a_layout_without_rows_for_every_rank_fails_at_start_up(tmp_path):
    files = [write_parquet(tmp_path / "tiny.parquet", documents(2), row_group_size=1)]
    with pytest.raises(DataError, match=r"data.eval_paths: 2 readable rows in 1 file\(s\) cannot give each of 3 "
                                        r"data-parallel ranks a share"):
        plan_shares(files, 3, loader_config(), source="data.eval_paths")


def _windows(batch: dict) -> np.ndarray:
    """The packed windows of a batch (input and target overlap in all but one token)."""
    return torch.cat([batch["input"][:, :1], batch["target"]], dim=1).numpy()


@pytest.mark.parametrize("sizes", [(2, 1), (1, 2), (2, 3), (3, 2), (2, 3, 1)])
def test_a_change_of_dp_size_consumes_the_rest_of_the_epoch_exactly_once(shards, monkeypatch, sizes):
    """Ranks read part of an epoch and save; the next run, on another number of ranks, deals the
    positions and reads on (the last one to the end of the epoch; (2, 3, 1) deals a dealt remainder).

    Documents are counted as the packer takes them (no prefetching, so what a state saved is
    what was taken): together the runs take every document of the epoch exactly once, and each
    new rank first emits the tokens its old ranks had packed but not emitted.
    """
    files, docs = shards
    cfg = loader_config(paths=files, loop=False, prefetch=0)  # a saving run's plan is made again from data.paths
    taken: list[tuple] = []
    record_documents(monkeypatch, lambda packer, doc: taken.append(tuple(doc)))
    runs = Resharding(cfg, sizes)
    emitted, carried = 0, 0
    for stage, rank, reader in runs:
        last, saved, size = stage == len(sizes) - 1, runs.saved, sizes[stage]
        # Mid-document and mid-segment, unevenly; the last run reads to the end.
        stream = [_windows(batch).ravel() for batch in islice(iter(reader), None if last else 9 + 4 * rank)]
        stream = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int64)
        if saved:
            old = len(saved)
            leftovers = [state_pending(saved[f"dp_rank_{k}"]) for k in range(rank, old, size)]
            leftovers = np.concatenate(leftovers) if leftovers else np.zeros(0, dtype=np.int64)
            assert np.array_equal(stream[: len(leftovers)], leftovers), (stage, rank)
            carried += len(leftovers)
        emitted += stream.size
    assert carried > 0  # runs stopped mid-document
    epoch = QualityFilterTokenizer(cfg)(TextBatch(docs, Position(0))).docs
    assert Counter(taken) == Counter(map(tuple, epoch))
    # Only each last rank's final remainder (less than a window) is not emitted.
    assert 0 <= sum(map(len, epoch)) - emitted < sizes[-1] * (cfg.seq_len + 1)


def test_a_file_matched_twice_is_listed_once(shards, tmp_path):
    files = expand_paths([str(tmp_path)])
    assert expand_paths([str(tmp_path), str(tmp_path / "*.parquet"), files[1], str(tmp_path / "." / "part-3.parquet")]) == files


def test_held_out_files_that_are_training_files_are_named_at_start_up(shards, tmp_path, caplog):
    from argonne_dt.config import Config
    from argonne_dt.evaluation import Evaluator

    (tmp_path / "held").mkdir()
    held_out = write_parquet(tmp_path / "held" / "h.parquet", documents(5, seed=11))
    cfg = Config()
    cfg.data.paths, cfg.data.eval_paths = [str(tmp_path)], [str(tmp_path / "." / "part-3.parquet"), held_out]
    with caplog.at_level(logging.WARNING):
        Evaluator.for_run(cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False), None)
    assert "1 held-out file(s) are training files too" in caplog.text and "part-3.parquet" in caplog.text
    caplog.clear()
    cfg.data.eval_paths = [held_out]
    with caplog.at_level(logging.WARNING):
        Evaluator.for_run(cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False), None)
    assert "training files too" not in caplog.text

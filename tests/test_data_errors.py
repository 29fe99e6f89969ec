"""Bad data: unreadable files and row groups skipped with a warning or stopping the run, transient read
errors retried, a missing column named. Data errors end a command like config errors: the message once,
no traceback (--debug keeps it), exit 2."""

import logging
import os
import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from argonne_dt.config import DataConfig
from argonne_dt.data import DataError, batches_for
from argonne_dt.errors import EXIT_CODE, run_reporting_user_errors
from helpers.documents import corrupt_row_group, documents, write_parquet
from helpers.loaders import batches, loader_config, loader_of, rank_texts, reader_of

ROOT = Path(__file__).parents[1]


@pytest.fixture
def bad_files(tmp_path):
    good = write_parquet(tmp_path / "a-good.parquet", documents(10))
    not_parquet = tmp_path / "b-notes.parquet"
    not_parquet.write_text("this is not a parquet file at all")
    truncated = tmp_path / "c-truncated.parquet"
    full = (tmp_path / "full.bin")
    write_parquet(full, documents(10, seed=5))
    truncated.write_bytes(full.read_bytes()[:300])
    last = write_parquet(tmp_path / "d-good.parquet", documents(10, seed=9))
    return [good, str(not_parquet), str(truncated), last]


def test_bad_shards_are_skipped_with_a_warning_and_counted(bad_files, caplog):
    reader = reader_of(bad_files, loop=False, on_bad_shard="skip")
    with caplog.at_level(logging.WARNING):
        texts = [t for batch in reader for t in batch.texts]
    assert texts == documents(10) + documents(10, seed=9)
    assert reader.get_state()["bad_shards"] == bad_files[1:3]
    assert "b-notes.parquet" in caplog.text and "c-truncated.parquet" in caplog.text


def test_bad_shard_stops_the_run_at_start_up_when_configured(bad_files):
    with pytest.raises(DataError, match=r"b-notes.parquet: unreadable parquet shard .*data.on_bad_shard=skip"):
        reader_of(bad_files, loop=False, on_bad_shard="error")


def test_missing_text_column_names_file_and_columns(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": ["1"]}), path)
    with pytest.raises(DataError, match=r"other.parquet: no column 'text' \(columns: content, id\)"):
        reader_of([str(path)], loop=False)


def test_invalid_utf8_is_replaced_not_fatal(tmp_path):
    raw = [b"valid text about the model " * 3, b"broken \xff\xfe bytes in the middle of a sentence here", None]
    path = write_parquet(tmp_path / "bytes.parquet", raw, binary=True)
    texts = [t for batch in reader_of([path], loop=False, on_bad_shard="error") for t in batch.texts]
    assert texts[1] == "broken \ufffd\ufffd bytes in the middle of a sentence here" and texts[2] is None
    got = batches(loader_of(loader_config(seq_len=7, loop=False), 1, [path]), 100)
    assert got and got[-1]["dropped"] == {"empty": 1}


class _FlakyFile:
    """A file whose reads fail while the shared budget of failures lasts."""

    def __init__(self, inner, failures):
        self._inner, self._failures = inner, failures

    def read(self, *args):
        if self._failures["left"] > 0:
            self._failures["left"] -= 1
            raise OSError("connection reset by peer")
        return self._inner.read(*args)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_transient_read_errors_are_retried_not_skipped(shards, caplog):
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    failures = {"left": 0}

    class FlakyFileSystem(LocalFileSystem):
        protocol = "flaky"

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("flaky://"))

        def _open(self, path, mode="rb", **kwargs):
            return _FlakyFile(super()._open(path, mode, **kwargs), failures)

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    files, docs = shards
    urls = [f"flaky://{path}" for path in files]
    failures["left"] = 3  # the first file's footer: three failed reads, then one that works
    reader = reader_of(urls, loop=False)
    failures["left"] = 2  # and the first row group
    with caplog.at_level(logging.WARNING):
        texts = [t for batch in reader for t in batch.texts]
    assert texts == rank_texts(files, 0, 1) and sorted(texts) == sorted(docs)
    assert reader.get_state()["bad_shards"] == []
    assert caplog.text.count("connection reset by peer; retrying") == 5


def test_a_corrupt_row_group_skips_that_row_group_only(tmp_path, caplog):
    docs = documents(24, seed=6)
    path = tmp_path / "corrupt.parquet"
    corrupt_row_group(path, docs, row_group_size=8, corrupt=1)
    after = write_parquet(tmp_path / "next.parquet", documents(5, seed=7))
    reader = reader_of([str(path), after], loop=False)
    with caplog.at_level(logging.WARNING):
        texts = [t for batch in reader for t in batch.texts]
    assert texts == docs[:8] + docs[16:] + documents(5, seed=7)
    assert reader.get_state()["bad_shards"] == [f"{path} row group 1"]


def test_a_share_with_nothing_readable_names_its_files(tmp_path):
    path = tmp_path / "only.parquet"
    corrupt_row_group(path, documents(8, seed=3), row_group_size=8, corrupt=0)
    with pytest.raises(DataError, match=r"no readable rows for dp rank 0 in its 1 segment\(s\) of .*only.parquet"):
        list(islice(reader_of([str(path)], loop=True), 3))


def test_an_error_from_the_reader_thread_prints_its_own_message_once(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.parquet"
    corrupt_row_group(path, documents(24, seed=6), 8, 0)
    cfg = DataConfig(paths=[str(path)], seq_len=15, min_tokens=1, on_bad_shard="error", read_retries=0, prefetch=2,
                     eval_split=0)

    def read():
        list(islice(iter(batches_for(cfg, 2)), 20))

    # The prefetching thread's exception reaches the caller as a DataError with that thread's traceback as text.
    with pytest.raises(DataError, match="Caught DataError"):
        read()
    monkeypatch.setenv("RANK", "0")
    assert run_reporting_user_errors(read) == EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith(f"data error: {path} row group 0: unreadable parquet shard (") and err.count("\n") == 1
    assert "Traceback" not in err and err.rstrip().endswith("set data.on_bad_shard=skip to skip it  "
                                                             "(--debug shows the traceback)")
    monkeypatch.setenv("RANK", "1")  # the same error on another rank: not printed again
    assert run_reporting_user_errors(read) == EXIT_CODE and capsys.readouterr().err == ""
    with pytest.raises(DataError):
        run_reporting_user_errors(read, debug=True)


@pytest.mark.e2e
def test_a_wrong_checkpoint_path_ends_evaluate_py_with_one_line(tmp_path):
    done = _launch("launch/evaluate.py", "--checkpoint", str(tmp_path / "none"), "--multiple-choice", "x.jsonl")
    assert done.returncode == EXIT_CODE and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"checkpoint error: {tmp_path / 'none'}: no complete checkpoint here")


def _launch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_a_missing_column_and_an_empty_directory_end_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"body": documents(20)}), tmp_path / "other" / "a.parquet")
    for data, message in [(tmp_path / "empty", f"data error: data.paths: '{tmp_path / 'empty'}' matches no file"),
                          (tmp_path / "other", f"data error: {tmp_path / 'other' / 'a.parquet'}: no column 'text' "
                                               "(columns: body); set data.text_column")]:
        done = _launch("launch/train_dt.py", "--config", "tiny.toml", "--parallel.tp=1", f"--data.paths={data}",
                       f"--job.dir={tmp_path / 'job'}")
        assert done.returncode == EXIT_CODE, done.stderr[-3000:]
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.mark.e2e
def test_an_unreadable_share_under_torchrun_is_reported_once_without_a_rank_traceback(tmp_path):
    """Found by the reader (rank 0 of the tp group) in its prefetching thread; its peer gets the same error."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    corrupt_row_group(corpus / "c.parquet", documents(40, seed=6), 8, 0)
    done = _launch("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "launch/train_dt.py",
                   "--config", "tiny.toml", f"--data.paths={corpus}", "--data.on_bad_shard=error",
                   "--data.read_retries=0", "--data.eval_split=0", "--train.eval_every=0", "--data.seq_len=32",
                   f"--job.dir={tmp_path / 'job'}")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("data error: ") == 1, output[-3000:]
    assert f"data error: {corpus / 'c.parquet'} row group 0: unreadable parquet shard" in output
    # torchrun's own summary of the failed ranks follows; no rank prints a Python traceback.
    assert "[rank0]" not in output and "[rank1]" not in output
    assert not re.search(r'File "[^"]*/argonne_dt/[^"]*\.py"', output.split("data error")[1])  # no frame of ours

"""Data errors end a command like config errors: the message once, no traceback (--debug keeps it), exit 2."""

import os
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
from helpers.documents import corrupt_row_group, documents

ROOT = Path(__file__).parents[1]


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
    assert "[rank0]" not in output and "[rank1]" not in output and "argonne_dt" not in output.split("data error")[1]

"""data.eval_split: a held-out part of data.paths, cut from the rows at plan time, the same under any
number of dp ranks and across a resume on another number, never trained on."""

import json
import os
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from argonne_dt.config import ConfigError, DataConfig, load_config
from argonne_dt.data import (
    DataError,
    Position,
    QualityFilterTokenizer,
    TextBatch,
    plan_shares,
)
from helpers.documents import documents, record_documents, write_parquet
from helpers.loaders import Resharding

ROOT = Path(__file__).parents[1]


@pytest.fixture
def corpus(tmp_path):
    """Three files of 70, 45 and 85 documents in row groups of 16 (200 rows: 0.05 holds out 4 + 2 + 4)."""
    docs = documents(200, seed=5)
    bounds = [0, 70, 115, 200]
    files = [write_parquet(tmp_path / f"part-{n}.parquet", docs[lo:hi], row_group_size=16)
             for n, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
    return files, docs


def config(files, **overrides) -> DataConfig:
    values = dict(paths=files, seq_len=31, num_workers=1, prefetch=0, tokenize_batch_size=3, min_tokens=1,
                  eval_split=0.05)
    values.update(overrides)
    return DataConfig(**values)


def held_out_in_order(corpus, cfg: DataConfig) -> list[str]:
    """The texts of the held-out rows, in the order of the plan (files of 70, 45, 85 rows; row groups of 16)."""
    files, docs = corpus
    texts = []
    for segment in plan_shares(files, 1, cfg, held_out=True).shares[0]:
        offset = {files[0]: 0, files[1]: 70, files[2]: 115}[segment.file] + 16 * segment.row_group
        texts += docs[offset + segment.start : offset + segment.stop]
    return texts


def rows_of(plan) -> Counter:
    """(file, row within its row group's file offset) of every row the plan's shares cover."""
    return Counter((s.file, s.row_group, row) for share in plan.shares for s in share for row in range(s.start, s.stop))


@pytest.mark.parametrize("split", [0.05, 0.02, 1.0])
def test_the_split_is_disjoint_complete_and_the_same_under_dp_1_2_3(corpus, split):
    files, _ = corpus
    cfg = config(files, eval_split=split)
    held_out = rows_of(plan_shares(files, 1, cfg, held_out=True))
    training = rows_of(plan_shares(files, 1, cfg))
    everything = rows_of(plan_shares(files, 1, config(files, eval_split=0.0)))
    assert max(held_out.values()) == max(training.values()) == 1
    assert not set(held_out) & set(training) and held_out + training == everything
    expected = 85 if split == 1.0 else sum(int(split * rows + 0.5) for rows in (70, 45, 85))  # nearest, per file
    assert sum(held_out.values()) == expected
    for dp in (2, 3):
        assert rows_of(plan_shares(files, dp, cfg)) == training
        assert rows_of(plan_shares(files, dp, cfg, held_out=True)) == held_out
    if split < 1:  # spread over the corpus: every file gives rows in proportion
        assert {file for file, _, _ in held_out} == set(files)


def test_no_split_when_eval_paths_are_given_and_clear_errors(corpus, tmp_path):
    files, _ = corpus
    with_eval_paths = config(files, eval_paths=[files[0]])
    assert rows_of(plan_shares(files, 2, with_eval_paths)) == rows_of(plan_shares(files, 2, config(files, eval_split=0)))
    with pytest.raises(DataError, match="no held-out split"):
        plan_shares(files, 1, with_eval_paths, held_out=True)
    with pytest.raises(DataError, match=r"data.eval_split=3 holds out 3 whole file\(s\), but data.paths has 3"):
        plan_shares(files, 1, config(files, eval_split=3.0))
    with pytest.raises(DataError, match=r"data.eval_split=0.005 of the 200 readable rows of data.paths holds out 0; "
                       r"each of 2 data-parallel ranks needs one: raise data.eval_split or give data.eval_paths"):
        plan_shares(files, 2, config(files, eval_split=0.005), held_out=True)
    with pytest.raises(ConfigError, match="data.eval_split=1.5 must be a fraction"):
        load_config("tiny.toml", ["--data.eval_split=1.5"])
    # Validation on one's own data needs no data.eval_paths any more (the split is the default) ...
    assert load_config("tiny.toml", [f"--data.paths={tmp_path}"]).data.eval_split == 0.005
    with pytest.raises(ConfigError, match="train.eval_every=50 needs held-out data"):
        load_config("tiny.toml", [f"--data.paths={tmp_path}", "--data.eval_split=0"])


def test_a_resume_on_another_dp_size_never_reads_the_held_out_rows(corpus, monkeypatch):
    """dp 2 reads part of the epoch, dp 3 continues to its end: every training document is taken once,
    no held-out one ever (the dealt remainder is cut from the training shares)."""
    files, docs = corpus
    cfg = config(files, loop=False)
    taken: list[tuple] = []
    record_documents(monkeypatch, lambda packer, doc: taken.append(tuple(doc)))
    for stage, _, reader in Resharding(cfg, (2, 3)):
        list(islice(iter(reader), 7 if stage == 0 else None))
    tokenized = {text: tuple(doc) for text, doc in zip(docs, QualityFilterTokenizer(cfg)(TextBatch(docs, Position(0))).docs)}
    held_out_texts = set(held_out_in_order(corpus, cfg))
    assert len(held_out_texts) == 10
    training = Counter(tokenized[text] for text in docs if text not in held_out_texts)
    assert Counter(taken) == training


def test_an_unreadable_file_moves_no_other_files_cut(corpus):
    """With data.on_bad_shard=skip, a file that becomes unreadable leaves every other file's cut as it was."""
    files, _ = corpus
    cfg = config(files, read_retries=0)
    before = {held_out: rows_of(plan_shares(files, 1, cfg, held_out=held_out)) for held_out in (False, True)}
    Path(files[0]).write_bytes(b"not parquet")
    for held_out, rows in before.items():
        others = Counter({row: n for row, n in rows.items() if row[0] != files[0]})
        assert rows_of(plan_shares(files, 1, cfg, held_out=held_out)) == others


def test_a_changed_split_or_a_split_older_than_the_key_stops_a_resume(tmp_path):
    """A checkpoint saved without data.eval_split ran with none: resuming it with the default is refused
    by name, as is any change of the split (rows trained on would become held-out ones)."""
    from argonne_dt.checkpoint import CheckpointError, config_changes, stored_config
    from argonne_dt.config import Config

    stored = Config().to_dict()
    del stored["data"]["eval_split"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert stored_config(tmp_path).data.eval_split == 0
    cfg = Config()
    cfg.data.paths = ["mine/"]
    with pytest.raises(CheckpointError, match=r"data.eval_split is 0.005 in this config but 0.0 in .*"
                                              r"set --data.eval_split=0.0 to resume"):
        config_changes(tmp_path, cfg)
    assert config_changes(tmp_path, cfg, resuming=False) == ["data.paths: [] -> ['mine/']",
                                                             "data.eval_split: 0.0 -> 0.005"]
    cfg.data.eval_split = 0.0
    assert config_changes(tmp_path, cfg) == ["data.paths: [] -> ['mine/']"]


def test_a_checkpoint_is_evaluated_on_its_runs_held_out_rows(corpus, tmp_path):
    """launch/evaluate.py without --data: the rows the run held out, exactly those (the same loss as
    the same texts written as a file of their own)."""
    from argonne_dt.checkpoint import write_model_checkpoint
    from argonne_dt.config import Config, ModelConfig
    from argonne_dt.evaluation import evaluate_checkpoint
    from argonne_dt.model import ArgonneModel

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=151_665, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            head_dim=16, max_seq_len=32)
    cfg.data = config(corpus[0])
    cfg.train.dtype = "fp32"
    model = ArgonneModel(cfg.model)
    model.init_weights(seed=1)
    checkpoint = str(write_model_checkpoint(model, cfg, tmp_path / "ckpt"))
    own = evaluate_checkpoint(checkpoint, micro_batch_size=2)
    held_out = write_parquet(tmp_path / "held-out.parquet", held_out_in_order(corpus, cfg.data), row_group_size=16)
    assert own == evaluate_checkpoint(checkpoint, [held_out], micro_batch_size=2)
    assert own != evaluate_checkpoint(checkpoint, [corpus[0][0]], micro_batch_size=2)


@pytest.mark.e2e
def test_torchrun_tiny_on_ones_own_parquet_logs_held_out_losses(tmp_path):
    """The README's command on a directory of one's own parquet files: no data.eval_paths needed."""
    mine = tmp_path / "mine"
    mine.mkdir()
    write_parquet(mine / "a.parquet", documents(250, seed=7), row_group_size=50)
    write_parquet(mine / "b.parquet", documents(150, seed=8), row_group_size=50)
    job = tmp_path / "job"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "launch/train_dt.py",
         "--config", "tiny.toml", f"--data.paths={mine}/", "--train.steps=4", "--train.eval_every=2",
         "--train.eval_batches=1", "--metrics.log_every=2", "--metrics.sample_every=0", "--data.seq_len=32",
         "--train.micro_batch_size=2", f"--job.dir={job}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in held_out] == [2, 4] and all(r["eval_loss"] > 0 for r in held_out)

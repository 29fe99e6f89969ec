"""Sample corpora and conversion to parquet shards: FineWeb's schema, cached, shuffled with a disjoint
held-out split, built by one process while the others wait."""

import threading
import time

import pyarrow.parquet as pq
import pytest

from argonne_dt import corpus
from argonne_dt.corpus import FINEWEB_SCHEMA, convert_to_shards, sample_corpus
from helpers.documents import write_parquet


@pytest.mark.slow
def test_sample_corpus_is_fineweb_parquet_and_cached(tmp_path):
    path = sample_corpus(tmp_path, max_files=60)
    shards_found = sorted(path.glob("*.parquet"))
    assert shards_found
    meta = pq.ParquetFile(shards_found[0])
    assert meta.schema_arrow.equals(FINEWEB_SCHEMA) and meta.num_row_groups > 1
    stamp = (path / "COMPLETE").stat().st_mtime_ns
    assert sample_corpus(tmp_path, max_files=60) == path and (path / "COMPLETE").stat().st_mtime_ns == stamp
    again = sample_corpus(tmp_path / "other", max_files=60)
    first_texts = pq.read_table(shards_found[0]).column("text").to_pylist()
    assert first_texts == pq.read_table(sorted(again.glob("*.parquet"))[0]).column("text").to_pylist()


@pytest.mark.slow
def test_sample_corpus_is_shuffled_deterministically_with_a_disjoint_held_out_split(tmp_path):
    from argonne_dt.corpus import sample_held_out, stdlib_documents

    def texts(directory):
        return [t for f in sorted(directory.glob("*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]

    training, held_out = texts(sample_corpus(tmp_path, max_files=60)), texts(sample_held_out(tmp_path, max_files=60))
    module_order = list(stdlib_documents(max_files=60))
    assert sorted(training + held_out) == sorted(module_order) and not set(training) & set(held_out)
    assert len(held_out) == -(-len(module_order) // 20)
    assert training[:10] != [t for t in module_order if t not in held_out][:10]  # not module order
    assert texts(sample_corpus(tmp_path / "again", max_files=60)) == training
    assert texts(sample_held_out(tmp_path / "again", max_files=60)) == held_out


def test_convert_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("a plain text document")
    (tmp_path / "b.jsonl").write_text('{"text": "first json"}\n\n{"text": "second json"}\n')
    source = write_parquet(tmp_path / "c.parquet", ["from parquet"])
    out = convert_to_shards([tmp_path / "a.txt", tmp_path / "b.jsonl", source], tmp_path / "out")
    table = pq.read_table(out[0])
    assert table.schema.equals(FINEWEB_SCHEMA)
    assert table.column("text").to_pylist() == ["a plain text document", "first json", "second json", "from parquet"]
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        convert_to_shards([tmp_path / "bad.jsonl"], tmp_path / "out2")


def test_one_process_builds_the_sample_corpus_while_the_others_wait(tmp_path, monkeypatch, capsys):
    """Three ranks asking at once (threads here: the lock is per open file, as between processes)."""
    builds = []
    real_documents = corpus.stdlib_documents

    def slow_documents(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(1.0)  # every asker arrives while the first one builds
        return real_documents(*args, **kwargs)

    monkeypatch.setattr(corpus, "stdlib_documents", slow_documents)
    found = []
    askers = [threading.Thread(target=lambda: found.append(corpus.sample_corpus(tmp_path, max_files=12)))
              for _ in range(3)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert len(builds) == 1 and len(set(found)) == 1 and (found[0] / "COMPLETE").exists()
    assert capsys.readouterr().err.count("sample corpus ready") == 1

"""Documents and the parquet files the tests write of them, a layout for one process, and a recorder
of the documents the packer takes."""

import random
import weakref
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = "the model reads packed tokens from parquet shards and every rank sees its own part of data".split()


def documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 120))) for i in range(count)]


def write_parquet(path, texts, row_group_size=8, binary=False):
    column_type = pa.binary() if binary else pa.string()
    table = pa.table({"text": pa.array(texts, type=column_type), "id": [str(i) for i in range(len(texts))]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def corrupt_row_group(path, docs, row_group_size, corrupt):
    """A parquet file whose footer reads but whose row group ``corrupt`` is garbage."""
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size, compression="none",
                   use_dictionary=False)
    chunk = pq.ParquetFile(path).metadata.row_group(corrupt).column(0)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def dp_layout(dp_rank: int, dp: int, reads_data: bool = True, tp_group=None) -> SimpleNamespace:
    """What ``batches_for`` asks of a layout, in one process: dp rank ``dp_rank`` of ``dp``, which reads."""
    return SimpleNamespace(dp_rank=dp_rank, dp=dp, reads_data=reads_data, tp_group=tp_group)


def record_documents(monkeypatch, record) -> None:
    """Call ``record(packer, document)`` for every document a ``TokenPacker`` made from now on takes.

    Only packers made after this call count: an earlier test's prefetching thread may still pull
    from its own."""
    from argonne_dt.data import TokenPacker

    ours = weakref.WeakSet()
    real_init, real_next = TokenPacker.__init__, TokenPacker._next_document
    monkeypatch.setattr(TokenPacker, "__init__",
                        lambda self, *args, **kwargs: (ours.add(self), real_init(self, *args, **kwargs))[1])

    def recording(self):
        doc = real_next(self)
        if self in ours:
            record(self, doc)
        return doc

    monkeypatch.setattr(TokenPacker, "_next_document", recording)

import random
import weakref
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from argonne_dt.config import ModelConfig


def odd_model_config(**overrides) -> ModelConfig:
    """Small, with the awkward sizes of the real model: head_dim not a power of two, vocab odd."""
    values = dict(
        vocab_size=1001, hidden_size=136, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=34,
        intermediate_size=0, max_seq_len=64, init_std=0.05,
    )
    values.update(overrides)
    return ModelConfig(**values)


def pytest_collection_modifyitems(items):
    """Distributed and end-to-end tests are slow by kind; ``pytest -m "not slow"`` leaves them out."""
    for item in items:
        if item.get_closest_marker("distributed") or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def odd_config() -> ModelConfig:
    return odd_model_config()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


WORDS = "the model reads packed tokens from parquet shards and every rank sees its own part of data".split()


def documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 120))) for i in range(count)]


def write_parquet(path, texts, row_group_size=8, binary=False):
    column_type = pa.binary() if binary else pa.string()
    table = pa.table({"text": pa.array(texts, type=column_type), "id": [str(i) for i in range(len(texts))]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


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

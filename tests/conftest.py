"""Fixtures used by several test files, and the hook that marks distributed and end-to-end tests slow.

Helpers the tests import live in ``tests/helpers/``."""

from pathlib import Path

import pytest
import torch

from argonne_dt.config import ModelConfig
from helpers.documents import documents, write_parquet
from helpers.models import odd_model_config
from helpers.teachers import write_qwen2_teacher


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


@pytest.fixture
def shards(tmp_path):
    """Three files of 40, 25 and 33 documents in row groups of 8 (mid-file and mid-group cuts exist)."""
    docs = documents(98)
    files = [
        write_parquet(tmp_path / "part-2.parquet", docs[:40]),
        write_parquet(tmp_path / "part-10.parquet", docs[65:]),
        write_parquet(tmp_path / "part-3.parquet", docs[40:65]),
    ]
    return files, docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """The training runs' corpus (read only), with ``-heldout`` and ``-single-row-group`` directories beside it."""
    root = tmp_path_factory.mktemp("corpus")
    write_parquet(root / "part-0.parquet", documents(60, seed=1), row_group_size=8)
    write_parquet(root / "part-1.parquet", documents(50, seed=2), row_group_size=8)
    heldout = Path(f"{root}-heldout")
    heldout.mkdir()
    write_parquet(heldout / "part-0.parquet", documents(20, seed=3), row_group_size=8)
    # As pandas and pyarrow write by default: one row group per file.
    single = Path(f"{root}-single-row-group")
    single.mkdir()
    for index in range(3):
        write_parquet(single / f"part-{index}.parquet", documents(30, seed=10 + index), row_group_size=30)
    return str(root)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> str:
    """A small random Qwen2 teacher (read only) in Hugging Face's layout."""
    return write_qwen2_teacher(tmp_path_factory.mktemp("qwen2"))

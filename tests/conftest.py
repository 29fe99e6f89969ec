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


@pytest.fixture
def odd_config() -> ModelConfig:
    return odd_model_config()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

"""Small model configs with the real model's awkward sizes, and a tiny checkpoint on the real vocabulary."""

from pathlib import Path

from argonne_dt.checkpoint import write_model_checkpoint
from argonne_dt.config import Config, ModelConfig
from argonne_dt.model import ArgonneModel


def odd_model_config(**overrides) -> ModelConfig:
    """Small, with the awkward sizes of the real model: head_dim not a power of two, vocab odd."""
    values = dict(
        vocab_size=1001, hidden_size=136, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=34,
        intermediate_size=0, max_seq_len=64, init_std=0.05,
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_checkpoint(root: Path, seed: int = 3) -> Path:
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=151_665, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, max_seq_len=64, init_std=0.1)
    cfg.data.seq_len = 32
    model = ArgonneModel(cfg.model)
    model.init_weights(seed=seed)
    return write_model_checkpoint(model, cfg, root)

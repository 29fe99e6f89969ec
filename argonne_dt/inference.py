"""Loading a trained model for inference: generation, evaluation, export, downstream scoring."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import ModelOptimizerState, load_checkpoint, resolve_checkpoint, stored_config
from .distributed import ParallelLayout
from .parallelize import build_model


def load_model(path: str | Path, device: torch.device | str = "cpu", layout: ParallelLayout | None = None):
    """The trained model of a checkpoint (a run dir or a step dir), plain or parallel under ``layout``.

    Returns (model in eval mode, the checkpoint's config). The model is built on the meta device
    and allocated once, so host memory holds one copy of the weights.
    """
    path = resolve_checkpoint(path)
    cfg = stored_config(path)
    model = build_model(cfg.model, layout, device)
    load_checkpoint(path, ModelOptimizerState(model, None))
    return model.eval(), cfg

"""What the tensor-parallel comparisons against one device share: the model, the layout a case runs
on, parameter names without the checkpoint wrapper, the error measure."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

from argonne_dt.config import ParallelConfig
from argonne_dt.distributed import ParallelLayout, layout_of

# 8 query / 4 kv heads of 18 dims: TP 4 holds 2 / 1; vocab 1001 is divisible by neither 2 nor 4.
MODEL = dict(vocab_size=1001, hidden_size=144, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=18)
BATCH, SEQ = 4, 16


def unwrapped_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def case_layout(shape, parallel: ParallelConfig) -> ParallelLayout:
    """The layout a case parallelizes over: all of the mesh with FSDP, else only its tp dimension
    (the other dp row runs the same case, for free)."""
    names = ("tp",) if len(shape) == 1 else ("dp", "tp")
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return layout_of(mesh if parallel.dp > 1 or mesh.ndim == 1 else mesh["tp"], parallel)

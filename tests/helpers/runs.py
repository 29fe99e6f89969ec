"""Training runs inside spawned ranks: the small config they share, a preemption hook, the weights a
checkpoint holds."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from argonne_dt.config import Config, load_config

STEPS = 6


def make_config(job_dir, corpus, **overrides) -> Config:
    """A small model on the real 151,665 vocabulary; fp32 so that runs are bit-for-bit repeatable."""
    words = [
        "--model.vocab_size=151665", "--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=8",
        "--model.num_kv_heads=4", "--model.head_dim=8", "--model.max_seq_len=64",
        "--data.seq_len=16", f"--data.paths={corpus}", "--data.num_workers=1", "--data.prefetch=2",
        "--data.tokenize_batch_size=4", "--data.min_tokens=1",
        "--optim.lr=3e-3", "--optim.min_lr=3e-4", "--optim.warmup_steps=2", "--optim.fused=false",
        f"--train.steps={STEPS}", "--train.micro_batch_size=2", "--train.dtype=fp32",
        "--checkpoint.every=2", "--checkpoint.keep_last=2", "--metrics.log_every=1", f"--job.dir={job_dir}",
    ]
    words += [f"--{k}={v}" for k, v in overrides.items()]
    return load_config(None, words)


def sigterm_after_step(step_to_signal: int):
    """An on_step hook: rank 0 receives SIGTERM after this step, like a preempted node."""
    import torch.distributed as dist

    def hook(step, record):
        if step == step_to_signal and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def train_in_process(cfg, on_step=None):
    from argonne_dt.trainer import train

    return train(cfg, on_step)


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    target = checkpoint.parent / (checkpoint.name + ".pt")
    dcp_to_torch_save(str(checkpoint), str(target))
    state = torch.load(target, weights_only=False)
    return state["train"]["model"]


def fail_data_at_step(trainer, step: int) -> None:
    """Once step ``step`` is done, the built ``trainer``'s data for the next step raises an error that is
    not a ``DataError`` (undecodable bytes), as a reader meeting a corrupt file would."""
    real_next = trainer.next_micro_batches

    def unreadable():
        raise UnicodeError("undecodable bytes")
        yield

    def next_micro_batches():
        if trainer.progress.step == step:
            trainer.batches = unreadable()
        return real_next()

    trainer.next_micro_batches = next_micro_batches

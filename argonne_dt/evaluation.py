"""Validation loss and perplexity on held-out data: during training and of a saved checkpoint."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import islice

import torch
import torch.distributed as dist

from .config import Config, DataConfig
from .inference import load_model
from .data import DataError, batches_for
from .distributed import (ParallelLayout, any_rank, compute_dtype, full_value, local_device, mixed_precision,
                          raise_on_every_rank)
from .loss import loss_context, next_token_loss
from .metrics import ProgressReporter


@torch.no_grad()
def evaluate(model, batches, device: torch.device, autocast, max_batches: int = 0, source: str = "",
             progress: ProgressReporter | None = None, layout: ParallelLayout | None = None) -> dict:
    """Mean next-token loss (and perplexity) over ``max_batches`` batches (0: all of them) of a model
    parallelized over ``layout`` (None: one device).

    Under data parallelism every rank runs the same number of batches (``_in_step``), and the mean
    is taken over all ranks' batches.
    """
    total = torch.zeros(2, device=device)  # loss sum, batch count
    for batch in _in_step(batches, max_batches, device):
        with autocast, loss_context(layout):
            total[0] += full_value(next_token_loss(model, batch, device)["loss"])
        total[1] += 1
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.finish()
    if dist.is_initialized():
        dist.all_reduce(total)  # tp ranks repeat their dp group's numbers: the ratio is unchanged
    if total[1] == 0:
        raise ValueError(f"validation data {source} yielded no batch: too little text for one batch of "
                         "micro_batch_size x (seq_len + 1) tokens")
    mean = (total[0] / total[1]).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}


def _in_step(batches, max_batches: int, device: torch.device):
    """Up to ``max_batches`` of ``batches`` (0: all), in step on every rank when distributed.

    The model's forward passes are collectives, so before each batch the ranks agree (one tiny
    all-reduce): all stop when any rank's data ends, and an exception of any rank's data is raised
    on every rank, with that rank's message, instead of leaving the others waiting. ``islice``
    stops before fetching a batch past the last one (each fetch reads and tokenizes data).
    """
    batches = islice(batches, max_batches or None)
    while True:
        batch, failure = None, None
        try:
            batch = next(batches)
        except StopIteration:
            pass
        except Exception as err:
            failure = err
        ended, failed = any_rank([batch is None and failure is None, failure is not None], device)
        if failed:
            raise_on_every_rank(failure, DataError, "the held-out data", device)
        if ended:
            return
        yield batch


class Evaluator:
    """The validation of a run, planned once: each call reads the same held-out batches afresh.

    The data is planned at construction, so a held-out set that cannot give every dp rank a batch
    stops the run at start-up, not at its first evaluation.
    """

    def __init__(self, data_cfg: DataConfig, micro_batch_size: int, max_batches: int, device: torch.device,
                 autocast, layout: ParallelLayout | None = None, held_out: bool = False):
        """The batches of ``data_cfg``'s training data, or with ``held_out`` of its held-out data (see
        ``data.batches_for``)."""
        self.max_batches, self.device, self.autocast, self.layout = max_batches, device, autocast, layout
        self.batches = batches_for(replace(data_cfg, loop=max_batches > 0), micro_batch_size, layout,
                                   held_out=held_out)

    @classmethod
    def for_run(cls, cfg: Config, device: torch.device, autocast, layout: ParallelLayout | None) -> Evaluator:
        """The validation ``train.eval_every`` asks for: the run's held-out data (the data.eval_split rows
        of data.paths, else data.eval_paths, else the sample corpus's held-out split); held-out files
        that data.paths lists too are named in a warning at start-up."""
        return cls(cfg.data, cfg.train.micro_batch_size, cfg.train.eval_batches, device, autocast, layout,
                   held_out=True)

    def __call__(self, model, progress: ProgressReporter | None = None) -> dict:
        return evaluate(model, self.batches, self.device, self.autocast, self.max_batches, self.batches.source,
                        progress, self.layout)


def evaluate_checkpoint(checkpoint: str, data_paths: list[str] | None = None, max_batches: int = 0,
                        micro_batch_size: int | None = None) -> dict:
    """Validation loss and perplexity of a checkpoint on held-out parquet data (one process); without
    ``data_paths``, on its run's held-out data (as ``train.eval_every`` evaluates it)."""
    device = local_device()
    model, cfg = load_model(checkpoint, device=device)
    autocast = mixed_precision(compute_dtype(cfg, device), device)
    cfg.train.eval_batches = max_batches
    cfg.train.micro_batch_size = micro_batch_size or cfg.train.micro_batch_size
    if data_paths:  # all of their rows (none held out of them)
        evaluator = Evaluator(replace(cfg.data, paths=data_paths, eval_split=0.0), cfg.train.micro_batch_size,
                              max_batches, device, autocast)
    else:
        evaluator = Evaluator.for_run(cfg, device, autocast, layout=None)
    return evaluator(model, ProgressReporter(max_batches or None, f"evaluating {checkpoint}", "batches"))

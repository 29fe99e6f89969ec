"""The data pipeline in one process, as the loader tests build it: their config, one dp rank's loader
and reader, the batches and texts they give, the packer's pending tokens in a saved state."""

from itertools import islice

from argonne_dt.config import DataConfig
from argonne_dt.data import ParquetDocumentReader, batches_for, plan_shares, share_loader

from .documents import dp_layout


def loader_config(**overrides) -> DataConfig:
    values = dict(seq_len=31, num_workers=2, prefetch=2, tokenize_batch_size=3, min_tokens=1)
    values.update(overrides)
    return DataConfig(**values)


def batches(loader, count):
    return [b for b in islice(iter(loader), count)]


def loader_of(cfg, micro_batch_size, files, dp_rank=0, dp_size=1):
    """The pipeline of one dp rank over all rows of ``files`` (``cfg`` names no data.paths: none held out)."""
    return share_loader(cfg, micro_batch_size, plan_shares(files, dp_size, cfg), dp_rank)


def packer_state(state):
    """The packer's own state (its position and pending tokens), found in the nested torchdata state."""
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "pending" in node:
                return node
            stack.extend(node.values())
    raise AssertionError("no packer state")


def state_pending(state):
    """The packer's pending tokens in a saved state."""
    return packer_state(state)["pending"]


def reader_of(files, rank=0, size=1, **overrides) -> ParquetDocumentReader:
    cfg = loader_config(retry_backoff_s=0.0, **overrides)
    return ParquetDocumentReader(plan_shares(files, size, cfg), rank, cfg, batch_size=5)


def rank_texts(files, rank, size):
    return [t for batch in reader_of(files, rank, size, loop=False, on_bad_shard="error") for t in batch.texts]


class Resharding:
    """Readers (``batches_for``, one dp rank each, micro-batch 1) through the dp sizes of ``sizes`` in
    turn, each size's ranks resumed from the positions the previous size saved. Iterating yields
    ``(stage, rank, reader)``; once the caller is done with a reader its state is kept: ``saved`` is
    the previous size's states during a stage, ``states`` the current (after the loop: the last) size's."""

    def __init__(self, cfg, sizes):
        self.cfg, self.sizes = cfg, sizes
        self.saved, self.states = {}, {}

    def __iter__(self):
        for stage, size in enumerate(self.sizes):
            self.saved, self.states = self.states, {}
            for rank in range(size):
                reader = batches_for(self.cfg, 1, dp_layout(rank, size))
                if self.saved:
                    reader.load_state_dict(self.saved)
                yield stage, rank, reader
                self.states.update(reader.state_dict())

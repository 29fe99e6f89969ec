"""Batches for the trainer and the evaluator: ``batches_for`` is the one entry point.

    share_loader            a dp rank's nodes -> Batcher -> Mapper (input, target) -> Prefetcher -> Loader
    TensorParallelBatches   the first rank of a tp group runs the loader; its peers receive each batch

``batches_for`` plans the shares itself (once, on rank 0, for every rank); the batches it returns
are checkpointed with ``state_dict`` / ``load_state_dict``, also across a change of the number of
dp ranks (the saving run's plan is made again from the same settings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchdata.nodes import BaseNode, Batcher, Loader, Mapper, ParallelMapper, Prefetcher

from ..config import DataConfig
from ..metrics import logger
from .files import DataError
from .nodes import ParquetDocumentReader, QualityFilterTokenizer, TokenPacker
from .shares import Resumption, SharePlan, reshard_positions, shared_plan

log = logger(__name__)


def _pinned() -> bool:
    """Whether batches go to page-locked memory: a GPU can then copy them without the host waiting."""
    return torch.cuda.is_available()


def _collate(windows: list[dict]) -> dict:
    tokens = torch.from_numpy(np.stack([w["tokens"] for w in windows]))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if _pinned():  # contiguous and page-locked: each goes to the GPU in one copy the host need not wait for
        inputs, targets = inputs.contiguous().pin_memory(), targets.contiguous().pin_memory()
    return {"input": inputs, "target": targets, "dropped": windows[-1]["dropped"],
            "documents": windows[-1]["documents"]}


def share_loader(cfg: DataConfig, micro_batch_size: int, plan: SharePlan, dp_rank: int = 0,
                 resumption: Resumption | None = None) -> Loader:
    """The pipeline of dp rank ``dp_rank``'s share of ``plan``: batches ``{"input", "target"}`` of
    (``micro_batch_size``, seq_len), started fresh or from ``resumption`` (see ``reshard_positions``)."""
    node: BaseNode = ParquetDocumentReader(plan, dp_rank, cfg, cfg.tokenize_batch_size, resumption)
    node = ParallelMapper(node, QualityFilterTokenizer(cfg), num_workers=cfg.num_workers, in_order=True,
                          method="thread")
    node = TokenPacker(node, cfg.seq_len + 1, resumption, f"dp rank {dp_rank}")
    node = Batcher(node, batch_size=micro_batch_size, drop_last=True)
    node = Mapper(node, _collate)
    if cfg.prefetch > 0:
        node = Prefetcher(node, prefetch_factor=cfg.prefetch)
    return Loader(node, restart_on_stop_iteration=False)


class TensorParallelBatches:
    """A dp rank's batches as all ranks of its tensor-parallel group see them.

    Only the group's first rank (``layout.reads_data``) reads and tokenizes; each batch reaches the
    peers by broadcast. The vocab-parallel embedding and loss combine partial results across the
    group, so its ranks must hold the same tokens: a read error on one rank cannot make them differ,
    and the tokenization is done once instead of tp times. No layout, or tp 1: a group of one, no
    communication.

    Per micro-batch two tensors go by ``dist.broadcast``, nothing is pickled: a header of int64
    (status, window shape, the running document and drop counts) and the windows of token ids.
    The end of the data and any exception of the reader travel in the header's status, so the
    peers stop or fail with the reader instead of waiting in the broadcast; only on that rare
    error path does the message go as an object. The tp group is a gloo group (``host_tp_group``):
    the batches stay in host memory, and neither sending nor reading a header waits for a GPU.
    """

    BATCH, END, ERROR = range(3)
    HEADER = 4 + len(QualityFilterTokenizer.RULES)  # status, rows, columns, documents, dropped per rule

    def __init__(self, cfg: DataConfig, micro_batch_size: int, plan: SharePlan, layout=None,
                 resumption: Resumption | None = None, held_out: bool = False):
        """``plan``: of ``cfg``'s training data, or (``held_out``) of its held-out data: a change of the
        number of dp ranks plans the same data again for the saving run's."""
        self.cfg, self.micro_batch_size, self.plan, self.held_out = cfg, micro_batch_size, plan, held_out
        self.dp_rank = layout.dp_rank if layout is not None else 0
        self.reads = layout.reads_data if layout is not None else True
        self.group = host_tp_group(layout) if layout is not None else None
        if not self.reads and self.group is None:
            raise ValueError("a rank that does not read needs the tp group to receive batches")
        self.loader = self._loader(resumption)
        self._batches = None

    @property
    def source(self) -> str:
        """The data read, as messages name it (e.g. ``data.eval_split=0.005 of data.paths``)."""
        return self.plan.source

    def _loader(self, resumption: Resumption | None) -> Loader | None:
        if not self.reads:
            return None
        return share_loader(self.cfg, self.micro_batch_size, self.plan, self.dp_rank, resumption)

    def __iter__(self):
        self._batches = None  # made by the first read (_read), where its errors are forwarded
        return self

    def __next__(self) -> dict:
        if self.group is None:
            return self._read()
        return self._send() if self.loader is not None else self._receive()

    def _read(self) -> dict:
        """The reader's next batch. The loader's iterator is made here, not in ``__iter__``: making it
        resets the pipeline, which raises a resume's errors (a data position that data.paths no longer
        matches), and those must come from ``next`` like any other, to reach the peers and the dp ranks."""
        if self._batches is None:
            self._batches = iter(self.loader)
        return next(self._batches)

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, group=self.group, group_src=0)
        return tensor

    def _signal(self, status: int) -> None:
        header = np.zeros(self.HEADER, dtype=np.int64)
        header[0] = status
        self._broadcast(torch.from_numpy(header))

    def _send(self) -> dict:
        try:
            batch = self._read()
        except StopIteration:
            self._signal(self.END)
            raise
        except Exception as err:
            self._signal(self.ERROR)
            reason = str(err) if isinstance(err, DataError) else \
                f"{type(err).__name__}: {err} (raised by the data reader of this tensor-parallel group)"
            dist.broadcast_object_list([reason], group=self.group, group_src=0)
            raise
        windows = torch.cat([batch["input"][:, :1], batch["target"]], dim=1)
        dropped = [batch["dropped"].get(rule, 0) for rule in QualityFilterTokenizer.RULES]
        self._broadcast(torch.from_numpy(np.array([self.BATCH, *windows.shape, batch["documents"], *dropped],
                                                  dtype=np.int64)))
        self._broadcast(windows)
        return batch

    def _receive(self) -> dict:
        header = np.empty(self.HEADER, dtype=np.int64)  # host memory, read without waiting for a device
        self._broadcast(torch.from_numpy(header))
        status, rows, columns, documents, *dropped = header.tolist()
        if status == self.END:
            raise StopIteration
        if status == self.ERROR:
            reason: list = [None]
            dist.broadcast_object_list(reason, group=self.group, group_src=0)
            raise DataError(reason[0])
        windows = self._broadcast(torch.empty(rows, columns, dtype=torch.int64))
        inputs, targets = windows[:, :-1], windows[:, 1:]
        if _pinned():  # as the reader's collate makes them
            inputs, targets = inputs.contiguous().pin_memory(), targets.contiguous().pin_memory()
        return {"input": inputs, "target": targets, "documents": documents,
                "dropped": {rule: n for rule, n in zip(QualityFilterTokenizer.RULES, dropped) if n}}

    def state_dict(self) -> dict[str, Any]:
        """The reader's data position, keyed by its dp rank (the peers that receive have none)."""
        return {f"dp_rank_{self.dp_rank}": self.loader.state_dict()} if self.reads else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the positions of a checkpoint (keyed by dp rank); called on every rank.

        Saved by as many dp ranks as this run has: this rank's position, token for token. Saved by
        another number: the unread rest of the epoch and the packed tokens of all saved ranks are
        dealt anew (``reshard_positions``; the saving run's plan is made again from the same settings).
        """
        saved = len(state)
        if saved == self.plan.dp_size:
            key = f"dp_rank_{self.dp_rank}"
            if self.reads:
                if key not in state:
                    raise DataError(f"the checkpoint has no data position for dp rank {self.dp_rank} "
                                    f"(it holds {', '.join(sorted(state))})")
                self.loader.load_state_dict(state[key])
            return
        missing = [rank for rank in range(saved) if f"dp_rank_{rank}" not in state]
        if missing:
            raise DataError(f"the checkpoint's data positions miss dp ranks {missing} of {saved}")
        old_plan = shared_plan(self.cfg, saved, self.held_out)
        resumptions = reshard_positions([state[f"dp_rank_{rank}"] for rank in range(saved)], old_plan,
                                        self.plan.dp_size)
        rows = sum(s.stop - s.start for r in resumptions for s in r.carryover)
        log.info("data: positions saved by %d dp rank(s), continuing on %d: the %d rows owed up to epoch %d and "
                 "%d packed tokens are dealt anew", saved, self.plan.dp_size, rows, resumptions[0].epoch,
                 sum(len(r.pending) for r in resumptions))
        self.loader = self._loader(resumptions[self.dp_rank])


_HOST_GROUPS: dict = {}


def host_tp_group(layout):
    """A gloo group of this rank's tp peers (None at tp 1): batches go to the peers in host memory.

    The layout's own tp group where it is gloo; over nccl a gloo twin, made once per layout by
    every rank (``new_group`` is collective: all ranks make every tp group's, in mesh order).
    """
    group = layout.tp_group
    if group is None or "gloo" in str(dist.get_backend(group)):
        return group
    if layout.mesh not in _HOST_GROUPS:
        tp_groups = layout.mesh.mesh.reshape(-1, layout.tp).tolist()  # one row of global ranks per tp group
        made = [dist.new_group(ranks, backend="gloo") for ranks in tp_groups]
        _HOST_GROUPS[layout.mesh] = next(g for g, ranks in zip(made, tp_groups) if layout.rank in ranks)
    return _HOST_GROUPS[layout.mesh]


def batches_for(cfg: DataConfig, micro_batch_size: int, layout=None, resumption: Resumption | None = None,
                held_out: bool = False) -> TensorParallelBatches:
    """The batches of this rank under ``layout`` (a ``ParallelLayout``; None: one process; a test's
    stand-in needs ``dp``, ``dp_rank``, ``reads_data`` and ``tp_group``, and over nccl ``mesh``, ``tp``
    and ``rank`` too): its dp rank's share, read by the first rank of its tp group, started fresh or
    from ``resumption``.

    The data is ``cfg``'s training data (data.paths less its held-out split, or the sample corpus),
    or with ``held_out`` its held-out data (the data.eval_split rows of data.paths, else
    data.eval_paths, else the sample corpus's held-out split). The shares are planned here, once,
    on global rank 0 for every rank: a layout that cannot give every dp rank a row fails at once.
    """
    plan = shared_plan(cfg, layout.dp if layout is not None else 1, held_out)
    return TensorParallelBatches(cfg, micro_batch_size, plan, layout, resumption, held_out)

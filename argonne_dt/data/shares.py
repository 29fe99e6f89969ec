"""Who reads which rows: share plans over the files, the held-out split, and positions dealt anew.

A ``SharePlan`` cuts the rows of the files into one contiguous share per data-parallel rank. It is
made once, on global rank 0, and received by every rank (``shared_plan``). A ``Position`` says
where a rank is in its share; ``reshard_positions`` deals the unread rest of an epoch when a run
continues on another number of dp ranks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch.distributed as dist

from ..config import DataConfig
from ..metrics import logger
from .files import DataError, data_files, read_metadata, report_unreadable, shared_files

log = logger(__name__)


@dataclass(frozen=True)
class Segment:
    """Rows ``start`` to ``stop`` (exclusive) of one row group of one file: the unit a rank reads."""

    file: str
    row_group: int
    start: int
    stop: int

    def describe(self) -> str:
        return f"{self.file} (row group {self.row_group}, rows {self.start}-{self.stop})"


@dataclass(frozen=True)
class SharePlan:
    """Each dp rank's segments, the files that could not be read when the plan was made, and the
    setting the files come from (``source``, as messages name it).

    The files' rows, in order, are cut into ``dp_size`` contiguous ranges of equal length (to
    one row): complete, disjoint and balanced whatever the number of files and row groups, also
    with one row group in all. A row group cut between two ranks is read by both, each keeping
    its own rows.
    """

    shares: tuple[tuple[Segment, ...], ...]
    unreadable: tuple[str, ...] = ()
    source: str = "data.paths"

    @property
    def dp_size(self) -> int:
        return len(self.shares)


def check_segment(share: tuple[Segment, ...], index: int, key: Segment | None) -> None:
    """That a saved data position, which points into segment ``key`` (None: no segment), still finds
    it at ``index`` of ``share``: the files must be those of the saving run."""
    if key is not None and (index >= len(share) or share[index] != key):
        raise DataError(f"the data position points into {key.describe()}, but data.paths and data.eval_split now "
                        "give other rows there: keep both as they were to resume")


@dataclass(frozen=True)
class Position:
    """Where the next unread document of a dp rank's share is, in an epoch.

    ``segment`` indexes the share and ``row`` that segment's rows; ``key`` is the segment itself
    (checked on use: the files must still be those of the plan). The share is the plan's, or
    ``carryover``: the remainder of an epoch dealt to this rank when the number of dp ranks changed.
    """

    epoch: int
    segment: int = 0
    row: int = 0
    key: Segment | None = None
    carryover: tuple[Segment, ...] | None = None

    def unread(self, plan_share: tuple[Segment, ...]) -> list[Segment]:
        """The segments (the first one cut) of this epoch that the share has not read yet."""
        share = self.carryover if self.carryover is not None else plan_share
        check_segment(share, self.segment, self.key)
        if self.segment >= len(share):
            return []
        current = share[self.segment]
        first = [Segment(current.file, current.row_group, current.start + self.row, current.stop)]
        return [segment for segment in first if segment.start < segment.stop] + list(share[self.segment + 1:])


@dataclass(frozen=True, eq=False)
class Resumption:
    """Where a dp rank starts when the run continues on another number of dp ranks.

    ``carryover``: the rows the old ranks owed up to epoch ``epoch`` dealt to this rank (read
    before its plan share, whose next epoch follows); ``pending``: tokens old ranks had packed but not emitted,
    emitted first; the running counts of the old ranks dealt to it. The default is a fresh start.
    """

    epoch: int = 0
    carryover: tuple[Segment, ...] | None = None
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dropped: dict = field(default_factory=dict)
    documents: int = 0
    bad_shards: tuple[str, ...] = ()


def _states_with(state, key: str) -> list[dict]:
    """The dicts holding ``key`` in a nested torchdata loader state."""
    found, stack = [], [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if key in node:
                found.append(node)
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return found


def reshard_positions(states: list[dict], old_plan: SharePlan, dp_size: int) -> list[Resumption]:
    """Deal what ``len(states)`` dp ranks still had to read up to the newest epoch to ``dp_size`` ranks.

    With ``data.loop`` the ranks read equal rows but unequal tokens, so they can be in different
    epochs: the newest epoch E is the one any rank reached. An old rank in epoch e still owes the
    unread rest of e (its partly read segment cut at the next unread document) and full passes of
    its share for epochs e + 1 .. E. All that is owed, oldest pass first and in rank order within
    a pass, is cut into ``dp_size`` contiguous, balanced ranges: the new ranks' remainder of epoch
    E, after which every rank reads epoch E + 1 of its new share. Old rank k's packed but
    unemitted tokens and running counts go to new rank k % dp_size. So every document is read as
    many times per epoch as without the change, and no packed token is lost. Deterministic: every
    rank computes the same dealing from the same states.
    """
    if len(states) != old_plan.dp_size:
        raise DataError(f"{len(states)} saved data positions, but the plan of the saving run has {old_plan.dp_size} shares")
    packers = []
    for rank, state in enumerate(states):
        found = [node for node in _states_with(state, "position") if "pending" in node]
        if len(found) != 1:
            raise DataError(f"the data position of dp rank {rank} has {len(found)} packer states, expected one")
        packers.append(found[0])
    positions = [packer["position"] for packer in packers]
    epoch = max(position.epoch for position in positions)
    owed = [[position.unread(share)] + [list(share)] * (epoch - position.epoch)  # per epoch from its own
            for position, share in zip(positions, old_plan.shares)]
    unread = [segment for pass_epoch in range(min(position.epoch for position in positions), epoch + 1)
              for position, passes in zip(positions, owed) if position.epoch <= pass_epoch
              for segment in passes[pass_epoch - position.epoch]]
    bad_shards = tuple(sorted({shard for state in states for node in _states_with(state, "bad_shards")
                               for shard in node["bad_shards"]}))
    resumptions = []
    for new_rank, carryover in enumerate(deal_rows(unread, dp_size)):
        mine = packers[new_rank::dp_size]
        dropped = Counter()
        for packer in mine:
            dropped.update(packer["dropped"])
        pending = [np.asarray(packer["pending"], dtype=np.int64) for packer in mine]
        resumptions.append(Resumption(epoch, carryover, np.concatenate(pending) if pending else Resumption().pending,
                                      dict(dropped), sum(packer["documents"] for packer in mine), bad_shards))
    return resumptions


def held_out_split(cfg: DataConfig) -> float:
    """The part of ``data.paths`` held out for validation (``data.eval_split``; 0 when data.eval_paths
    or the sample corpus provide the held-out data)."""
    return cfg.eval_split if cfg.paths and not cfg.eval_paths else 0.0


def split_rows(segments: list[Segment], files: list[str], split: float) -> tuple[list[Segment], list[Segment]]:
    """(training, held-out) parts of ``segments``: ``split`` < 1 holds out that fraction of the rows, the
    last rows of each row group in proportion (rounded to the nearest over the file's running total, so
    spread evenly through each file; a file of 100 rows gives one at 0.005); a whole number holds out
    the last ``split`` files. A file's cut depends on its own rows only: never on the number of dp
    ranks, nor on other files (one skipped as unreadable moves no other file's cut), so every run and
    every resume cuts the same rows."""
    if split >= 1:
        held_files = set(files[-int(split):])
        return ([s for s in segments if s.file not in held_files], [s for s in segments if s.file in held_files])
    training, held, offset = [], [], 0
    for number, segment in enumerate(segments):
        if number and segment.file != segments[number - 1].file:
            offset = 0
        rows = segment.stop - segment.start
        held_rows = math.floor(split * (offset + rows) + 0.5 + 1e-9) - math.floor(split * offset + 0.5 + 1e-9)
        cut = segment.stop - held_rows
        if cut > segment.start:
            training.append(replace(segment, stop=cut))
        if held_rows:
            held.append(replace(segment, start=cut))
        offset += rows
    return training, held


def plan_shares(files: list[str], dp_size: int, cfg: DataConfig, source: str = "data.paths",
                held_out: bool = False) -> SharePlan:
    """Read the files' row counts (parquet footers only) and cut them into ``dp_size`` shares.

    The rows of ``held_out_split(cfg)`` are left out of the shares, or with ``held_out`` they are
    the only ones dealt. A layout that cannot give every rank a row fails here, at start-up,
    naming the data.
    """
    if not files:
        raise DataError(f"{source}: no parquet files to read")
    split = held_out_split(cfg)
    if split >= 1 and split >= len(files):
        raise DataError(f"data.eval_split={split:g} holds out {int(split)} whole file(s), but {source} has "
                        f"{len(files)}: lower it, or give data.eval_paths")
    row_groups: list[tuple[str, int, int]] = []
    unreadable: list[str] = []
    for path in files:
        try:
            metadata = read_metadata(path, cfg.read_retries, cfg.retry_backoff_s)
        except (pa.ArrowException, OSError) as err:
            report_unreadable(path, err, cfg.on_bad_shard)
            unreadable.append(path)
            continue
        names = metadata.schema.to_arrow_schema().names
        if cfg.text_column not in names:
            raise DataError(f"{path}: no column {cfg.text_column!r} (columns: {', '.join(names)}); set data.text_column")
        row_groups += [(path, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
    segments = [Segment(path, group, 0, rows) for path, group, rows in row_groups]
    if split:
        training, held = split_rows(segments, files, split)
        segments = held if held_out else training
    elif held_out:
        raise DataError(f"{source}: no held-out split (data.eval_split is 0, or data.eval_paths is set)")
    total = sum(segment.stop - segment.start for segment in segments)
    if total < dp_size and held_out:
        readable = sum(segment.stop - segment.start for segment in training + held)
        raise DataError(f"data.eval_split={split:g} of the {readable} readable rows of {source} holds out {total}; "
                        f"each of {dp_size} data-parallel ranks needs one: raise data.eval_split or give "
                        "data.eval_paths")
    if total < dp_size:
        raise DataError(
            f"{source}: {total} readable rows in {len(files)} file(s) cannot give each of {dp_size} data-parallel "
            "ranks a share: add data or use fewer dp ranks"
        )
    return SharePlan(deal_rows(segments, dp_size), tuple(unreadable), source)


def deal_rows(segments: list[Segment], parts: int) -> tuple[tuple[Segment, ...], ...]:
    """Cut the rows of ``segments``, in order, into ``parts`` contiguous ranges equal to one row."""
    total = sum(segment.stop - segment.start for segment in segments)
    bounds = [part * total // parts for part in range(parts + 1)]
    shares: list[list[Segment]] = [[] for _ in range(parts)]
    offset = 0
    for segment in segments:
        rows = segment.stop - segment.start
        for part in range(parts):
            lo, hi = max(bounds[part], offset), min(bounds[part + 1], offset + rows)
            if lo < hi:
                shares[part].append(Segment(segment.file, segment.row_group, segment.start + lo - offset,
                                            segment.start + hi - offset))
        offset += rows
    return tuple(map(tuple, shares))


def _plan(cfg: DataConfig, dp_size: int, held_out: bool) -> SharePlan:
    """The plan of the training data (data.paths, less its held-out split), or with ``held_out`` of
    the held-out data: the data.eval_split rows of data.paths, else data.eval_paths (its files that
    data.paths lists too named in a warning), else the sample corpus's held-out split."""
    if not held_out or held_out_split(cfg):
        return plan_shares(data_files(cfg.paths), dp_size, cfg, "data.paths", held_out)
    files = data_files(cfg.eval_paths, held_out=True)
    overlap = shared_files(data_files(cfg.paths), files) if cfg.paths and cfg.eval_paths else []
    if overlap:
        log.warning("data.eval_paths: %d held-out file(s) are training files too (data.paths): %s; the held-out "
                    "loss on them is not a held-out loss", len(overlap), ", ".join(overlap))
    return plan_shares(files, dp_size, cfg, f"data.eval_paths={cfg.eval_paths}")


def shared_plan(cfg: DataConfig, dp_size: int, held_out: bool = False) -> SharePlan:
    """The plan of ``cfg``'s training data (or, ``held_out``, of its held-out data) for ``dp_size`` ranks,
    made once, on global rank 0, and received by every rank (one plan for all; a bad layout fails
    on every rank with the same message)."""
    return computed_once(lambda: _plan(cfg, dp_size, held_out))


def computed_once(compute: Callable[[], Any]) -> Any:
    """``compute()`` run on global rank 0 only, its result received by every rank. Its ``DataError``
    is raised as it is on rank 0 (the traceback kept, for --debug) and with the same message on
    every other rank: all stop at once."""
    if not dist.is_initialized():
        return compute()
    outcome: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("value", compute())
        except DataError as err:
            failure, outcome[0] = err, ("error", str(err))
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "error":
        raise DataError(value)
    return value

"""The training data pipeline on ``torchdata.nodes``, with an exact, checkpointable position.

    ParquetDocumentReader   streams row groups of this dp rank's share; yields lists of raw texts
      -> ParallelMapper     quality filter + batched tokenization (threads, in order)
      -> TokenPacker        BOS/EOS around documents, concatenated, cut into seq_len + 1 windows
      -> Batcher -> Mapper  (input, target) = (w[:-1], w[1:]) as LongTensors
      -> Prefetcher -> Loader

Every node is stateful. ``torchdata.nodes`` records, for each item a prefetching or parallel
node hands on, the state of its source at that item, so ``state_dict()`` after batch k resumes
at batch k + 1 exactly: nothing prefetched is skipped or repeated.
"""

from __future__ import annotations

import glob as globlib
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchdata.nodes import BaseNode, Batcher, Loader, Mapper, ParallelMapper, Prefetcher

from .config import DataConfig
from .tokenizer import BOS_TOKEN, EOS_TOKEN, load_tokenizer

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Input data that cannot be used; the message names the file and what to do."""


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _resolved(path: str) -> str:
    """One name per file: local paths resolved (``..``, links); URLs as listed."""
    return path if "://" in path else os.path.realpath(path)


def expand_paths(patterns: list[str]) -> list[str]:
    """Files, directories (their *.parquet) and globs, local or fsspec URLs, in natural order.

    A file that several patterns match (``[dir, dir + "/*.parquet"]``) is listed once, where first
    matched: an epoch reads every file once.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if "://" in pattern:
            import fsspec

            fs, _, matches = fsspec.get_fs_token_paths(pattern)
            if len(matches) == 1 and fs.isdir(matches[0]):
                matches = fs.glob(matches[0].rstrip("/") + "/*.parquet")
            protocol = pattern.split("://", 1)[0]
            found = [m if "://" in m else f"{protocol}://{m}" for m in matches]
        elif any(ch in pattern for ch in "*?["):
            found = globlib.glob(pattern, recursive=True)
        elif os.path.isdir(pattern):
            found = globlib.glob(f"{pattern.rstrip('/')}/*.parquet")
        else:
            found = [pattern]
        if not found:
            raise DataError(f"data.paths: {pattern!r} matches no file")
        for path in sorted(found, key=_natural_key):
            if _resolved(path) not in seen:
                seen.add(_resolved(path))
                files.append(path)
    return files


def shared_files(training: list[str], held_out: list[str]) -> list[str]:
    """The held-out files that are training files too (a held-out loss on them measures memorization)."""
    trained = {_resolved(path) for path in training}
    return [path for path in held_out if _resolved(path) in trained]


def data_files(paths: list[str], held_out: bool = False) -> list[str]:
    """The parquet files of ``data.paths`` (or of ``data.eval_paths``, ``held_out=True``); when empty,
    the bundled sample corpus's training shards (or its held-out split)."""
    if paths:
        return expand_paths(paths)
    from .corpus import sample_corpus, sample_held_out

    return expand_paths([str(sample_held_out() if held_out else sample_corpus())])


def _open(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return path


def _texts(column: pa.ChunkedArray) -> list[str | None]:
    """Column values as str; bytes that are not valid UTF-8 are replaced, not fatal."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if b is None else b.decode("utf-8", errors="replace") for b in column.to_pylist()]
    return column.to_pylist()


def _retrying(action, what: str, retries: int, backoff_s: float):
    """``action()``, tried again after an ``OSError`` (a network or NFS hiccup) with doubling delays."""
    for attempt in range(retries + 1):
        try:
            return action()
        except OSError as err:
            if attempt == retries:
                raise
            delay = backoff_s * 2**attempt
            log.warning("%s: %s; retrying in %.1f s (%d of %d)", what, err, delay, attempt + 1, retries)
            time.sleep(delay)


def _unreadable(what: str, err: Exception, on_bad_shard: str) -> None:
    """Stop with an error naming ``what`` (``data.on_bad_shard = "error"``), or warn that it is skipped."""
    if on_bad_shard == "error":
        raise DataError(f"{what}: unreadable parquet shard ({err}); set data.on_bad_shard=skip to skip it") from err
    log.warning("skipping unreadable parquet shard %s: %s", what, err)


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
    """Each dp rank's segments, and the files that could not be read when the plan was made.

    The files' rows, in order, are cut into ``dp_size`` contiguous ranges of equal length (to
    one row): complete, disjoint and balanced whatever the number of files and row groups, also
    with one row group in all. A row group cut between two ranks is read by both, each keeping
    its own rows.
    """

    shares: tuple[tuple[Segment, ...], ...]
    unreadable: tuple[str, ...] = ()

    @property
    def dp_size(self) -> int:
        return len(self.shares)


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
        if self.key is not None and (self.segment >= len(share) or share[self.segment] != self.key):
            raise _moved_position(self.key)
        if self.segment >= len(share):
            return []
        current = share[self.segment]
        first = [Segment(current.file, current.row_group, current.start + self.row, current.stop)]
        return [segment for segment in first if segment.start < segment.stop] + list(share[self.segment + 1:])


@dataclass
class TextBatch:
    """Texts of one segment as the reader yields them, and the position of the first."""

    texts: list
    position: Position


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


def _moved_position(segment: Segment) -> DataError:
    """The error of a saved data position that no longer matches the plan."""
    return DataError(f"the data position points into {segment.describe()}, but data.paths and data.eval_split now "
                     "give other rows there: keep both as they were to resume")


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
            metadata = _retrying(lambda: _read_metadata(path), path, cfg.read_retries, cfg.retry_backoff_s)
        except (pa.ArrowException, OSError) as err:
            _unreadable(path, err, cfg.on_bad_shard)
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
    return SharePlan(deal_rows(segments, dp_size), tuple(unreadable))


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


def _read_metadata(path: str):
    source = _open(path)
    try:
        return pq.ParquetFile(source).metadata
    finally:
        if hasattr(source, "close"):
            source.close()


def shared_plan(files: list[str], dp_size: int, cfg: DataConfig, source: str = "data.paths",
                held_out: bool = False) -> SharePlan:
    """``plan_shares`` computed once, on global rank 0, and received by every rank (one plan for all;
    a bad layout fails on every rank with the same message)."""
    return computed_once(lambda: plan_shares(files, dp_size, cfg, source, held_out))


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


class ParquetDocumentReader(BaseNode[list]):
    """Yields lists of up to ``batch_size`` texts of this dp rank's share, one row group at a time.

    A read that fails with an ``OSError`` is tried again (``data.read_retries``, doubling delays
    from ``data.retry_backoff_s``); then an unopenable file is skipped for this epoch, and an
    unreadable row group skips that row group only. Each is counted once in ``bad_shards``.
    """

    def __init__(self, plan: SharePlan, dp_rank: int, cfg: DataConfig, batch_size: int,
                 resumption: Resumption | None = None):
        super().__init__()
        self.plan, self.dp_rank, self.cfg, self.batch_size = plan, dp_rank, cfg, batch_size
        self.resumption = resumption

    def _start_state(self) -> dict:
        start = self.resumption or Resumption()
        return {"epoch": start.epoch, "segment": -1, "row": 0, "segment_key": None,
                "bad_shards": sorted(set(self.plan.unreadable) | set(start.bad_shards)), "dp_rank": self.dp_rank,
                "dp_size": self.plan.dp_size,
                "carryover": None if start.carryover is None else [self._key(s) for s in start.carryover]}

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        state = initial_state or self._start_state()
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.plan.dp_size):
            raise DataError(
                f"the data position was saved by dp rank {state['dp_rank']} of {state['dp_size']}, "
                f"now dp rank {self.dp_rank} of {self.plan.dp_size}: a position belongs to its dp rank; "
                "continuing on another number of ranks deals the positions of all ranks anew "
                "(reshard_positions, which the trainer does)"
            )
        carryover = state["carryover"]
        self.carryover = None if carryover is None else tuple(Segment(*key) for key in carryover)
        self.share = self.plan.shares[self.dp_rank] if self.carryover is None else self.carryover
        self.epoch, self.segment, self.row = state["epoch"], state["segment"], state["row"]
        saved, at = state["segment_key"], max(self.segment, 0)
        if saved is not None and (at >= len(self.share) or self._key(self.share[at]) != saved):
            raise _moved_position(Segment(*saved))
        self.bad_shards = list(state["bad_shards"])
        self._parquet, self._parquet_path = None, None
        self._rows: list = []
        self._unopenable: set[str] = set()
        if self.segment >= 0 and not self._load(self.share[self.segment]):  # resume inside a segment
            self.row = 0

    @staticmethod
    def _key(segment: Segment) -> list:
        return [segment.file, segment.row_group, segment.start, segment.stop]

    def get_state(self) -> dict:
        # The segment read (or, before the first read, about to be read) names the data for the
        # check on resume that data.paths still lists the same files there.
        at = max(self.segment, 0)
        return {"epoch": self.epoch, "segment": self.segment, "row": self.row,
                "segment_key": self._key(self.share[at]) if at < len(self.share) else None,
                "bad_shards": list(self.bad_shards), "dp_rank": self.dp_rank, "dp_size": self.plan.dp_size,
                "carryover": None if self.carryover is None else [self._key(s) for s in self.carryover]}

    def _bad(self, what: str, err: Exception) -> None:
        _unreadable(what, err, self.cfg.on_bad_shard)
        if what not in self.bad_shards:  # counted once, not again every epoch
            self.bad_shards.append(what)

    def _load(self, segment: Segment) -> bool:
        """Read ``segment``'s rows; False (after counting it) when it cannot be read."""
        retries, backoff_s = self.cfg.read_retries, self.cfg.retry_backoff_s
        if self._parquet_path != segment.file:
            self._parquet, self._parquet_path = None, segment.file
            try:
                self._parquet = _retrying(lambda: pq.ParquetFile(_open(segment.file)), segment.file, retries, backoff_s)
            except (pa.ArrowException, OSError) as err:
                self._parquet_path = None
                self._unopenable.add(segment.file)
                self._bad(segment.file, err)
                return False

        def attempt():
            if self._parquet is None:  # dropped after a failed read: the handle may be what broke
                self._parquet = pq.ParquetFile(_open(segment.file))
            try:
                return self._parquet.read_row_group(segment.row_group, columns=[self.cfg.text_column])
            except OSError:
                self._parquet = None
                raise

        what = f"{segment.file} row group {segment.row_group}"
        try:
            table = _retrying(attempt, what, retries, backoff_s)
        except (pa.ArrowException, OSError) as err:
            self._bad(what, err)
            return False
        self._rows = _texts(table.column(0))[segment.start : segment.stop]
        return True

    def _advance(self) -> bool:
        """Move to this rank's next readable segment; False at the end of the share."""
        while self.segment + 1 < len(self.share):
            self.segment, self.row = self.segment + 1, 0
            segment = self.share[self.segment]
            if segment.file in self._unopenable:
                continue  # its other row groups cannot be read either, this epoch
            if self._load(segment):
                return True
        self._rows = []
        return False

    def next(self) -> TextBatch:
        while self.row >= len(self._rows):
            if not self._advance():
                if not self.cfg.loop:
                    raise StopIteration
                # A new epoch reads the plan's share (a dealt remainder covered the rest of the old one).
                self.epoch += 1
                self.carryover, self.share = None, self.plan.shares[self.dp_rank]
                self.segment, self.row, self._rows, self._unopenable = -1, 0, [], set()
                if not self._advance():
                    files = sorted({segment.file for segment in self.share})
                    raise DataError(f"data.paths: no readable rows for dp rank {self.dp_rank} in its "
                                    f"{len(self.share)} segment(s) of {', '.join(files[:3])}"
                                    f"{' ...' if len(files) > 3 else ''}: see the warnings above for why")
        texts = self._rows[self.row : self.row + self.batch_size]
        position = Position(self.epoch, self.segment, self.row, self.share[self.segment], self.carryover)
        self.row += len(texts)
        return TextBatch(texts, position)


@dataclass
class TokenizedDocs:
    """Token ids of the documents of a ``TextBatch`` that passed the filters, what each rule dropped,
    the position of each kept document, and the position after the batch."""

    docs: list[list[int]]
    dropped: Counter = field(default_factory=Counter)
    positions: list[Position] = field(default_factory=list)
    end: Position | None = None


class QualityFilterTokenizer:
    """The original run's rules, then batched tokenization with BOS / EOS around each document."""

    # Each rule that drops documents, and the setting it follows.
    RULES = {"empty": "data.text_column (null or blank texts)", "digit_ratio": "data.max_digit_ratio",
             "alpha_space_ratio": "data.min_alpha_space_ratio", "too_few_tokens": "data.min_tokens"}

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.bos = [self.tokenizer.convert_tokens_to_ids(BOS_TOKEN)] if cfg.add_bos else []
        self.eos = [self.tokenizer.convert_tokens_to_ids(EOS_TOKEN)] if cfg.add_eos else []

    def rejects(self, text: str | None) -> str | None:
        """The name of the first rule that drops ``text`` before tokenization, or None."""
        if text is None or not text.strip():
            return "empty"
        if len(text) > self.cfg.min_chars_for_ratio_filter:
            if sum(map(str.isdigit, text)) / len(text) > self.cfg.max_digit_ratio:
                return "digit_ratio"
            letters_and_spaces = sum(c.isalpha() or c.isspace() for c in text)
            if letters_and_spaces / len(text) < self.cfg.min_alpha_space_ratio:
                return "alpha_space_ratio"
        return None

    def __call__(self, batch: TextBatch) -> TokenizedDocs:
        start = batch.position
        result = TokenizedDocs([], end=replace(start, row=start.row + len(batch.texts)))
        kept, rows = [], []
        for row, text in enumerate(batch.texts, start.row):
            rule = self.rejects(text)
            if rule:
                result.dropped[rule] += 1
            else:
                kept.append(text)
                rows.append(row)
        # The Rust tokenizer directly: no length warnings for long documents, less overhead.
        encodings = self.tokenizer.backend_tokenizer.encode_batch(kept, add_special_tokens=False) if kept else []
        for doc, row in zip((e.ids for e in encodings), rows):
            if len(doc) < self.cfg.min_tokens:
                result.dropped["too_few_tokens"] += 1
            else:
                result.docs.append(self.bos + doc + self.eos)
                result.positions.append(replace(start, row=row))
        return result


class TokenPacker(BaseNode[dict]):
    """Concatenates documents and cuts windows of ``window`` tokens; only the final remainder is lost.

    State: the source's state before the current batch of documents, the index of the next
    document in it, the pending tokens, running counts, and the position of the next unread
    document (what ``reshard_positions`` deals when the number of dp ranks changes). On restore
    the batch is produced again (deterministically) and packing continues mid-document.
    ``resumption`` starts a fresh packer with the tokens other ranks had packed but not emitted.

    A whole pass over the share (an epoch read from its start) that keeps no document raises a
    ``DataError`` naming ``owner``, the files and the rules that dropped them: with ``data.loop``
    the packer would otherwise wait for a document forever, and without it the data would end
    before its first batch with nothing to say why.
    """

    def __init__(self, source: BaseNode[TokenizedDocs], window: int, resumption: Resumption | None = None,
                 owner: str = "this rank"):
        super().__init__()
        self.source, self.window, self.owner = source, window, owner
        self.resumption = resumption or Resumption()

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._batch = TokenizedDocs([])
        if initial_state is None:
            self.source.reset()
            self._source_state, self._doc_index = None, 0
            start = self.resumption
            self._start = Position(start.epoch, carryover=start.carryover)
            self._pending = np.asarray(start.pending, dtype=np.int64)
            self.dropped, self.documents = Counter(start.dropped), start.documents
            # A dealt remainder is part of an epoch: the first whole pass is the next one.
            self._start_pass(start.epoch, whole=start.carryover is None)
            return
        self._start_pass(initial_state["position"].epoch, whole=False)
        self._source_state = initial_state["source"]
        self.source.reset(self._source_state)
        self._doc_index = initial_state["doc_index"]
        self._start = initial_state["position"]
        if self._source_state is not None:
            try:
                self._batch = next(self.source)
            except StopIteration:
                pass
        self._pending = np.asarray(initial_state["pending"], dtype=np.int64)
        self.dropped, self.documents = Counter(initial_state["dropped"]), initial_state["documents"]

    def _position(self) -> Position:
        if self._doc_index < len(self._batch.docs):
            return self._batch.positions[self._doc_index]
        return self._batch.end or self._start

    def get_state(self) -> dict:
        return {"source": self._source_state, "doc_index": self._doc_index, "pending": self._pending.copy(),
                "dropped": dict(self.dropped), "documents": self.documents, "position": self._position()}

    def _start_pass(self, epoch: int, whole: bool) -> None:
        """Watch the pass of ``epoch``: ``whole`` when it is read from its start."""
        self._epoch, self._barren = epoch, whole
        self._barren_dropped, self._barren_files = Counter(), []

    def _barren_pass(self) -> DataError:
        files = self._barren_files
        rules = ", ".join(f"{rule}: {count}, set by {QualityFilterTokenizer.RULES[rule]}"
                          for rule, count in self._barren_dropped.most_common())
        return DataError(
            f"{self.owner}: a whole pass over {', '.join(files[:3])}{' ...' if len(files) > 3 else ''} "
            f"kept no document: the quality filter dropped all {sum(self._barren_dropped.values())} "
            f"documents ({rules}); change those settings, or the files of data.paths / data.eval_paths")

    def _watch_for_a_barren_pass(self, batch: TokenizedDocs) -> None:
        if batch.end.epoch != self._epoch:
            if self._barren:
                raise self._barren_pass()
            self._start_pass(batch.end.epoch, whole=True)
        if batch.docs:
            self._barren = False
        elif self._barren:
            self._barren_dropped.update(batch.dropped)
            if batch.end.key.file not in self._barren_files:
                self._barren_files.append(batch.end.key.file)

    def _next_document(self) -> list[int]:
        while self._doc_index >= len(self._batch.docs):
            self._source_state = self.source.state_dict()
            try:
                self._batch = next(self.source)
            except StopIteration:
                # data.loop false: the source ends after one pass, before a next epoch shows it barren.
                # (A pass that read no row at all is the reader's to report: it warned of each file.)
                if self._barren and self._barren_dropped:
                    raise self._barren_pass() from None
                raise
            self._doc_index = 0
            self.dropped.update(self._batch.dropped)
            self._watch_for_a_barren_pass(self._batch)
        self._doc_index += 1
        self.documents += 1
        return self._batch.docs[self._doc_index - 1]

    def next(self) -> dict:
        if len(self._pending) < self.window:
            parts = [self._pending]
            have = len(self._pending)
            while have < self.window:
                doc = self._next_document()
                parts.append(np.asarray(doc, dtype=np.int64))
                have += len(doc)
            self._pending = np.concatenate(parts)
        window, self._pending = self._pending[: self.window], self._pending[self.window :]
        return {"tokens": window, "dropped": dict(self.dropped), "documents": self.documents}


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


@dataclass
class DataLoader:
    """Iterable of batches ``{"input", "target"}`` (B, seq_len) with ``state_dict`` / ``load_state_dict``."""

    loader: Loader

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def build_data_loader(cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                      files: list[str] | None = None, plan: SharePlan | None = None,
                      resumption: Resumption | None = None) -> DataLoader:
    """The pipeline for one dp rank, over ``plan`` (by default planned here from ``files`` or ``cfg.paths``),
    started fresh or from ``resumption`` (see ``reshard_positions``)."""
    if plan is None:
        plan = plan_shares(files if files is not None else data_files(cfg.paths), dp_size, cfg)
    node: BaseNode = ParquetDocumentReader(plan, dp_rank, cfg, cfg.tokenize_batch_size, resumption)
    node = ParallelMapper(node, QualityFilterTokenizer(cfg), num_workers=cfg.num_workers, in_order=True,
                          method="thread")
    node = TokenPacker(node, cfg.seq_len + 1, resumption, f"dp rank {dp_rank}")
    node = Batcher(node, batch_size=micro_batch_size, drop_last=True)
    node = Mapper(node, _collate)
    if cfg.prefetch > 0:
        node = Prefetcher(node, prefetch_factor=cfg.prefetch)
    return DataLoader(Loader(node, restart_on_stop_iteration=False))


class TensorParallelBatches:
    """A dp rank's batches as all ranks of its tensor-parallel group see them.

    Only the group's first rank (``reads``) reads and tokenizes; each batch reaches the peers by
    broadcast. The vocab-parallel embedding and loss combine partial results across the group, so
    its ranks must hold the same tokens: a read error on one rank cannot make them differ, and the
    tokenization is done once instead of tp times. ``tp_group=None``: a group of one, no communication.

    Per micro-batch two tensors go by ``dist.broadcast``, nothing is pickled: a header of int64
    (status, window shape, the running document and drop counts) and the windows of token ids.
    The end of the data and any exception of the reader travel in the header's status, so the
    peers stop or fail with the reader instead of waiting in the broadcast; only on that rare
    error path does the message go as an object. ``tp_group`` is a gloo group (``host_tp_group``):
    the batches stay in host memory, and neither sending nor reading a header waits for a GPU.
    """

    BATCH, END, ERROR = range(3)
    HEADER = 4 + len(QualityFilterTokenizer.RULES)  # status, rows, columns, documents, dropped per rule

    def __init__(self, cfg: DataConfig, micro_batch_size: int, plan: SharePlan, dp_rank: int = 0,
                 reads: bool = True, tp_group=None):
        if not reads and tp_group is None:
            raise ValueError("a rank that does not read needs the tp group to receive batches")
        self.cfg, self.micro_batch_size, self.plan, self.dp_rank = cfg, micro_batch_size, plan, dp_rank
        self.reads, self.group = reads, tp_group
        self.loader = self._loader(None)
        self._batches = None

    def _loader(self, resumption: Resumption | None) -> DataLoader | None:
        if not self.reads:
            return None
        return build_data_loader(self.cfg, self.micro_batch_size, self.dp_rank, self.plan.dp_size, plan=self.plan,
                                 resumption=resumption)

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
        dealt anew (``reshard_positions``; the saving run's plan is made again from data.paths).
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
        old_plan = shared_plan(data_files(self.cfg.paths), saved, self.cfg)
        resumptions = reshard_positions([state[f"dp_rank_{rank}"] for rank in range(saved)], old_plan,
                                        self.plan.dp_size)
        if not dist.is_initialized() or dist.get_rank() == 0:
            rows = sum(s.stop - s.start for r in resumptions for s in r.carryover)
            print(f"data: positions saved by {saved} dp rank(s), continuing on {self.plan.dp_size}: the "
                  f"{rows} rows owed up to epoch {resumptions[0].epoch} and "
                  f"{sum(len(r.pending) for r in resumptions)} packed tokens are dealt anew", flush=True)
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


def batches_for(cfg: DataConfig, micro_batch_size: int, plan: SharePlan, layout=None) -> TensorParallelBatches:
    """The batches of this rank under ``layout`` (a ``ParallelLayout``; None: one process):
    its dp rank's share of ``plan``, read by the first rank of its tp group."""
    if layout is None:
        return TensorParallelBatches(cfg, micro_batch_size, plan)
    return TensorParallelBatches(cfg, micro_batch_size, plan, layout.dp_rank, layout.reads_data,
                                 host_tp_group(layout))

"""The ``torchdata.nodes`` that turn a dp rank's share into windows of tokens.

    ParquetDocumentReader   streams row groups of this dp rank's share; yields lists of raw texts
      -> ParallelMapper     QualityFilterTokenizer: quality filter + batched tokenization (threads, in order)
      -> TokenPacker        BOS/EOS around documents, concatenated, cut into seq_len + 1 windows

Every node is stateful: ``state_dict()`` after an item resumes at the next item exactly. The reader
and the packer carry the ``Position`` of the next unread document, which ``shares.reshard_positions``
deals anew when the number of dp ranks changes. ``loader.py`` batches the windows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
from torchdata.nodes import BaseNode

from ..config import DataConfig
from ..tokenizer import BOS_TOKEN, EOS_TOKEN, load_tokenizer
from .files import DataError, ParquetTexts, report_unreadable
from .shares import Position, Resumption, Segment, SharePlan, check_segment


@dataclass
class TextBatch:
    """Texts of one segment as the reader yields them, and the position of the first."""

    texts: list
    position: Position


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
                "(reshard_positions, which loading the positions of all ranks does)"
            )
        carryover = state["carryover"]
        self.carryover = None if carryover is None else tuple(Segment(*key) for key in carryover)
        self.share = self.plan.shares[self.dp_rank] if self.carryover is None else self.carryover
        self.epoch, self.segment, self.row = state["epoch"], state["segment"], state["row"]
        saved = state["segment_key"]
        check_segment(self.share, max(self.segment, 0), None if saved is None else Segment(*saved))
        self.bad_shards = list(state["bad_shards"])
        self._file = ParquetTexts(self.cfg.text_column, self.cfg.read_retries, self.cfg.retry_backoff_s)
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
        report_unreadable(what, err, self.cfg.on_bad_shard)
        if what not in self.bad_shards:  # counted once, not again every epoch
            self.bad_shards.append(what)

    def _load(self, segment: Segment) -> bool:
        """Read ``segment``'s rows; False (after counting it) when it cannot be read."""
        try:
            self._file.open(segment.file)
        except (pa.ArrowException, OSError) as err:
            self._unopenable.add(segment.file)
            self._bad(segment.file, err)
            return False
        try:
            texts = self._file.row_group(segment.row_group)
        except (pa.ArrowException, OSError) as err:
            self._bad(f"{segment.file} row group {segment.row_group}", err)
            return False
        self._rows = texts[segment.start : segment.stop]
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
                    raise DataError(f"{self.plan.source}: no readable rows for dp rank {self.dp_rank} in its "
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

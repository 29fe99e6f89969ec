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
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchdata.nodes import BaseNode, Batcher, Loader, Mapper, ParallelMapper, Prefetcher

from .config import DataConfig
from .tokenizer import BOS_TOKEN, EOS_TOKEN, load_tokenizer

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Input data that cannot be used; the message names the file and what to do."""


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def expand_paths(patterns: list[str]) -> list[str]:
    """Files, directories (their *.parquet) and globs, local or fsspec URLs, in natural order."""
    files: list[str] = []
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
        files.extend(sorted(found, key=_natural_key))
    return files


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


class ParquetDocumentReader(BaseNode[list]):
    """Yields lists of up to ``batch_size`` texts, streaming one row group at a time.

    Row group ``g`` of file ``f`` belongs to dp rank ``(f + g) % dp_size``: disjoint across
    ranks, complete together, and balanced also when there are fewer files than ranks.
    """

    def __init__(self, files: list[str], text_column: str, dp_rank: int, dp_size: int, batch_size: int,
                 loop: bool, on_bad_shard: str):
        super().__init__()
        if not files:
            raise DataError("data.paths: no parquet files to read")
        self.files, self.text_column = files, text_column
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.batch_size, self.loop, self.on_bad_shard = batch_size, loop, on_bad_shard

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        state = initial_state or {"epoch": 0, "file": 0, "row_group": -1, "row": 0, "bad_shards": [],
                                  "dp_rank": self.dp_rank, "dp_size": self.dp_size}
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise DataError(
                f"the data position was saved by dp rank {state['dp_rank']} of {state['dp_size']}, "
                f"now dp rank {self.dp_rank} of {self.dp_size}: resuming with another number of "
                "data-parallel ranks would skip or repeat documents; keep the number of nodes or "
                "start the data afresh"
            )
        self.epoch, self.file_index = state["epoch"], state["file"]
        saved_path = state.get("file_path")
        if saved_path is not None and (self.file_index >= len(self.files) or self.files[self.file_index] != saved_path):
            raise DataError(
                f"the data position points into {saved_path} (file {self.file_index}), but data.paths now "
                "lists other files there: keep data.paths as it was to resume, or start the data afresh"
            )
        self.bad_shards = list(state["bad_shards"])
        self._parquet = None
        self._rows: list = []
        self.row_group, self.row = state["row_group"], state["row"]
        if self.row_group >= 0 and self._open_file():  # resume inside a row group: read it again
            self._load_row_group(self.row_group)

    def get_state(self) -> dict:
        current = self.files[self.file_index] if self.file_index < len(self.files) else None
        return {"epoch": self.epoch, "file": self.file_index, "file_path": current, "row_group": self.row_group,
                "row": self.row, "bad_shards": list(self.bad_shards), "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def _bad_shard(self, err: Exception) -> None:
        path = self.files[self.file_index]
        if self.on_bad_shard == "error":
            raise DataError(f"{path}: unreadable parquet shard ({err}); set data.on_bad_shard=skip to skip it") from err
        log.warning("skipping unreadable parquet shard %s: %s", path, err)
        if path not in self.bad_shards:  # counted once, not again every epoch
            self.bad_shards.append(path)
        self._next_file()

    def _next_file(self) -> None:
        self._parquet, self._rows = None, []
        self.file_index, self.row_group, self.row = self.file_index + 1, -1, 0

    def _open_file(self) -> bool:
        path = self.files[self.file_index]
        try:
            self._parquet = pq.ParquetFile(_open(path))
        except (pa.ArrowException, OSError) as err:
            self._bad_shard(err)
            return False
        names = self._parquet.schema_arrow.names
        if self.text_column not in names:
            raise DataError(f"{path}: no column {self.text_column!r} (columns: {', '.join(names)}); set data.text_column")
        return True

    def _load_row_group(self, index: int) -> bool:
        try:
            table = self._parquet.read_row_group(index, columns=[self.text_column])
        except (pa.ArrowException, OSError) as err:
            self._bad_shard(err)
            return False
        self._rows = _texts(table.column(0))
        return True

    def _advance(self) -> bool:
        """Move to this rank's next row group; False at the end of the files."""
        while self.file_index < len(self.files):
            if self._parquet is None and not self._open_file():
                continue
            group = self.row_group + 1
            while group < self._parquet.num_row_groups and (self.file_index + group) % self.dp_size != self.dp_rank:
                group += 1
            if group >= self._parquet.num_row_groups:
                self._next_file()
                continue
            if self._load_row_group(group):
                self.row_group, self.row = group, 0
                return True
        return False

    def next(self) -> list:
        while self.row >= len(self._rows):
            if not self._advance():
                if not self.loop:
                    raise StopIteration
                self.epoch += 1
                self.file_index, self.row_group, self.row, self._parquet, self._rows = 0, -1, 0, None, []
                if not self._advance():
                    raise DataError(f"data.paths: no readable rows for dp rank {self.dp_rank} in {len(self.files)} file(s)")
        texts = self._rows[self.row : self.row + self.batch_size]
        self.row += len(texts)
        return texts


@dataclass
class TokenizedDocs:
    """Token ids of the documents that passed the filters, and what each rule dropped."""

    docs: list[list[int]]
    dropped: Counter = field(default_factory=Counter)


class QualityFilterTokenizer:
    """The original run's rules, then batched tokenization with BOS / EOS around each document."""

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

    def __call__(self, texts: list) -> TokenizedDocs:
        result = TokenizedDocs([])
        kept = []
        for text in texts:
            rule = self.rejects(text)
            if rule:
                result.dropped[rule] += 1
            else:
                kept.append(text)
        # The Rust tokenizer directly: no length warnings for long documents, less overhead.
        encodings = self.tokenizer.backend_tokenizer.encode_batch(kept, add_special_tokens=False) if kept else []
        for doc in (e.ids for e in encodings):
            if len(doc) < self.cfg.min_tokens:
                result.dropped["too_few_tokens"] += 1
            else:
                result.docs.append(self.bos + doc + self.eos)
        return result


class TokenPacker(BaseNode[dict]):
    """Concatenates documents and cuts windows of ``window`` tokens; only the final remainder is lost.

    State: the source's state before the current batch of documents, the index of the next
    document in it, the pending tokens, and running counts. On restore the batch is produced again
    (deterministically) and packing continues mid-document.
    """

    def __init__(self, source: BaseNode[TokenizedDocs], window: int):
        super().__init__()
        self.source, self.window = source, window

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._batch = TokenizedDocs([])
        if initial_state is None:
            self.source.reset()
            self._source_state, self._doc_index = None, 0
            self._pending = np.zeros(0, dtype=np.int64)
            self.dropped, self.documents = Counter(), 0
            return
        self._source_state = initial_state["source"]
        self.source.reset(self._source_state)
        self._doc_index = initial_state["doc_index"]
        if self._source_state is not None:
            try:
                self._batch = next(self.source)
            except StopIteration:
                pass
        self._pending = np.asarray(initial_state["pending"], dtype=np.int64)
        self.dropped, self.documents = Counter(initial_state["dropped"]), initial_state["documents"]

    def get_state(self) -> dict:
        return {"source": self._source_state, "doc_index": self._doc_index, "pending": self._pending.copy(),
                "dropped": dict(self.dropped), "documents": self.documents}

    def _next_document(self) -> list[int]:
        while self._doc_index >= len(self._batch.docs):
            self._source_state = self.source.state_dict()
            self._batch = next(self.source)
            self._doc_index = 0
            self.dropped.update(self._batch.dropped)
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


def _collate(windows: list[dict]) -> dict:
    tokens = torch.from_numpy(np.stack([w["tokens"] for w in windows]))
    return {"input": tokens[:, :-1], "target": tokens[:, 1:], "dropped": windows[-1]["dropped"],
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
                      files: list[str] | None = None) -> DataLoader:
    """The pipeline for one dp rank (every tp rank of that dp group builds the same one)."""
    if files is None:
        if cfg.paths:
            files = expand_paths(cfg.paths)
        else:
            from .corpus import sample_corpus

            files = expand_paths([str(sample_corpus())])
    node: BaseNode = ParquetDocumentReader(files, cfg.text_column, dp_rank, dp_size, cfg.tokenize_batch_size,
                                           cfg.loop, cfg.on_bad_shard)
    node = ParallelMapper(node, QualityFilterTokenizer(cfg), num_workers=cfg.num_workers, in_order=True,
                          method="thread")
    node = TokenPacker(node, cfg.seq_len + 1)
    node = Batcher(node, batch_size=micro_batch_size, drop_last=True)
    node = Mapper(node, _collate)
    if cfg.prefetch > 0:
        node = Prefetcher(node, prefetch_factor=cfg.prefetch)
    return DataLoader(Loader(node, restart_on_stop_iteration=False))

"""The files of the data: patterns expanded, parquet files opened (local or fsspec URLs), reads retried.

Nothing here knows of ranks or shares: ``shares.py`` plans over these files, ``nodes.py`` reads them.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq

from ..metrics import logger

log = logger(__name__)


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
    """The parquet files of ``paths``; when empty, the bundled sample corpus's training shards (or,
    ``held_out=True``, its held-out split)."""
    if paths:
        return expand_paths(paths)
    from ..corpus import sample_corpus, sample_held_out

    return expand_paths([str(sample_held_out() if held_out else sample_corpus())])


def open_file(path: str):
    """What ``pq.ParquetFile`` reads: the local path itself, or an open fsspec file for a URL."""
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return path


def retrying(action, what: str, retries: int, backoff_s: float):
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


def report_unreadable(what: str, err: Exception, on_bad_shard: str) -> None:
    """Stop with an error naming ``what`` (``data.on_bad_shard = "error"``), or warn that it is skipped."""
    if on_bad_shard == "error":
        raise DataError(f"{what}: unreadable parquet shard ({err}); set data.on_bad_shard=skip to skip it") from err
    log.warning("skipping unreadable parquet shard %s: %s", what, err)


def read_metadata(path: str, retries: int, backoff_s: float) -> pq.FileMetaData:
    """The footer of a parquet file (its row groups and schema), without reading its data."""

    def attempt():
        source = open_file(path)
        try:
            return pq.ParquetFile(source).metadata
        finally:
            if hasattr(source, "close"):
                source.close()

    return retrying(attempt, path, retries, backoff_s)


def _texts(column: pa.ChunkedArray) -> list[str | None]:
    """Column values as str; bytes that are not valid UTF-8 are replaced, not fatal."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if b is None else b.decode("utf-8", errors="replace") for b in column.to_pylist()]
    return column.to_pylist()


class ParquetTexts:
    """The texts of one column, a row group at a time, of one parquet file after another.

    A file stays open while its row groups are read. Each open and each read is retried after an
    ``OSError`` (``retries`` times, doubling delays from ``backoff_s``); a read that failed drops
    the handle, which may be what broke, and the next attempt opens the file again.
    """

    def __init__(self, column: str, retries: int, backoff_s: float):
        self.column, self.retries, self.backoff_s = column, retries, backoff_s
        self._file, self._path = None, None

    def open(self, path: str) -> None:
        """Make ``path`` the file read (a no-op when it is); raises what opening it raised, after the retries."""
        if self._path == path:
            return
        self._file, self._path = None, path
        try:
            self._file = retrying(lambda: pq.ParquetFile(open_file(path)), path, self.retries, self.backoff_s)
        except (pa.ArrowException, OSError):
            self._path = None
            raise

    def row_group(self, index: int) -> list[str | None]:
        """The texts of row group ``index`` of the open file; raises what reading it raised, after the retries."""

        def attempt():
            if self._file is None:
                self._file = pq.ParquetFile(open_file(self._path))
            try:
                return self._file.read_row_group(index, columns=[self.column])
            except OSError:
                self._file = None
                raise

        table = retrying(attempt, f"{self._path} row group {index}", self.retries, self.backoff_s)
        return _texts(table.column(0))

"""FineWeb-schema parquet shards: the bundled sample corpus, and conversion of a user's own text.

The sample corpus is built offline and deterministically on first use from the docstrings of
the Python standard library (English text present on every Python installation; files are
parsed with ``ast``, never imported), shuffled with a fixed seed, split into training shards and
a held-out split, then cached.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .metrics import ProgressReporter


class CorpusInputError(ValueError):
    """An input file that cannot become shards (no text column, a line that is not JSON); the message
    names the file and line."""

FINEWEB_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("id", pa.string()),
        ("dump", pa.string()),
        ("url", pa.string()),
        ("date", pa.string()),
        ("file_path", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        ("token_count", pa.int64()),
    ]
)
SAMPLE_CORPUS_VERSION = 3
HELD_OUT_DIR = "heldout"
# One document in 20 (and at least one) goes to the held-out split.
_HELD_OUT_EVERY = 20
_SHUFFLE_SEED = 2025
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3"}


def _record(text: str, source: str, dump: str) -> dict:
    return {
        "text": text,
        "id": hashlib.sha1(f"{source}\0{text}".encode("utf-8", "replace")).hexdigest(),
        "dump": dump,
        "url": source,
        "date": "",
        "file_path": source,
        "language": "en",
        "language_score": 1.0,
        "token_count": -1,  # unknown until tokenized
    }


def write_shards(
    records: Iterable[dict], out_dir: str | Path, rows_per_shard: int = 256, rows_per_row_group: int = 64
) -> list[Path]:
    """Write records (FineWeb columns) as ``shard-00000.parquet`` ... with several row groups each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    pending: list[dict] = []

    def flush():
        path = out_dir / f"shard-{len(paths):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(pending, schema=FINEWEB_SCHEMA), path, row_group_size=rows_per_row_group)
        paths.append(path)
        pending.clear()

    for record in records:
        pending.append(record)
        if len(pending) == rows_per_shard:
            flush()
    if pending:
        flush()
    return paths


def stdlib_documents(max_files: int | None = None, show_progress: bool = False) -> Iterator[str]:
    """One document per standard-library module: its module, class and function docstrings."""
    files = _stdlib_files(max_files)
    progress = ProgressReporter(len(files), "building the sample corpus", "modules") if show_progress else None
    for path in files:
        if progress is not None:
            progress.advance()
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
        docstrings = [d for d in (ast.get_docstring(n) for n in nodes) if d]
        if docstrings:
            yield "\n\n".join(docstrings)


def _stdlib_files(max_files: int | None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts)))
    return files[:max_files]


def default_cache_dir() -> Path:
    base = os.environ.get("ARGONNE_DT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "argonne_dt")
    return Path(base).expanduser()


def sample_corpus(cache_dir: str | Path | None = None, max_files: int | None = None) -> Path:
    """The directory of the sample corpus's training shards, built on first use by one process while the
    others (all ranks ask for it) wait; its held-out split is in ``HELD_OUT_DIR`` below it (see
    ``sample_held_out``).

    The documents are in a shuffled order fixed by a seed (module order would put the easy,
    alphabetically first modules at the start of every run); every 20th of that order is held out.
    """
    version = f"v{SAMPLE_CORPUS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
    suffix = f"-{max_files}" if max_files else ""
    target = Path(cache_dir or default_cache_dir()) / f"sample_corpus-{version}{suffix}"
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process builds it; the others (every rank calls this) wait here and find it complete.
    with _exclusive(target.parent / f".{target.name}.lock"):
        if not (target / "COMPLETE").exists():
            _build_sample_corpus(target, max_files)
    return target


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Held by one process (or thread) at a time: an advisory lock on ``lock_path``, released on exit,
    also when the holder dies."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_sample_corpus(target: Path, max_files: int | None) -> None:
    print(f"building the sample corpus in {target} (once; stdlib docstrings)...", file=sys.stderr, flush=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        records = [_record(text, f"python-stdlib-doc/{i}", "python-stdlib-docstrings")
                   for i, text in enumerate(stdlib_documents(max_files, show_progress=True))]
        random.Random(_SHUFFLE_SEED).shuffle(records)
        held_out = records[::_HELD_OUT_EVERY]
        training = [r for i, r in enumerate(records) if i % _HELD_OUT_EVERY]
        paths = write_shards(training, building, rows_per_shard=128, rows_per_row_group=32)
        write_shards(held_out, building / HELD_OUT_DIR, rows_per_shard=128, rows_per_row_group=32)
        (building / "COMPLETE").write_text(json.dumps({"shards": len(paths), "held_out_documents": len(held_out)}))
        try:
            os.rename(building, target)
        except OSError:  # a process on another machine (a shared cache without locks) finished first: identical
            if not (target / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"sample corpus ready: {len(list(target.glob('*.parquet')))} shards", file=sys.stderr, flush=True)


def sample_held_out(cache_dir: str | Path | None = None, max_files: int | None = None) -> Path:
    """The held-out split of the sample corpus (disjoint from its training shards)."""
    return sample_corpus(cache_dir, max_files) / HELD_OUT_DIR


def _read_inputs(paths: Iterable[str | Path], text_key: str) -> Iterator[dict]:
    paths = [Path(p) for p in paths]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise CorpusInputError(f"no such input file: {', '.join(missing)}")
    progress = ProgressReporter(len(paths), "converting", "files")
    for path in paths:
        yield from _records_of(path, text_key)
        progress.advance()


def _records_of(path: Path, text_key: str) -> Iterator[dict]:
    """One file's documents: parquet rows, JSONL rows, or a whole text file."""
    if path.suffix == ".parquet":
        table = pq.ParquetFile(path)
        if text_key not in table.schema_arrow.names:
            raise CorpusInputError(f"{path}: no column {text_key!r} (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[text_key]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield _record(text, str(path), "converted")
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusInputError(f"{path}:{number}: expected a JSON object with a {text_key!r} field") from None
                if text:
                    yield _record(text, f"{path}:{number}", "converted")
    else:
        # Plain text: the whole file is one document.
        text = path.read_text(encoding="utf-8", errors="replace")
        yield _record(text, str(path), "converted")


def convert_to_shards(
    inputs: Iterable[str | Path], out_dir: str | Path, text_key: str = "text", rows_per_shard: int = 10_000,
    rows_per_row_group: int = 1_000,
) -> list[Path]:
    """Text files (one document each), JSONL (``text_key`` field) or parquet -> FineWeb-schema shards."""
    return write_shards(_read_inputs(inputs, text_key), out_dir, rows_per_shard, rows_per_row_group)

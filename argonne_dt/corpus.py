"""FineWeb-schema parquet shards: the bundled sample corpus, and conversion of a user's own text.

The sample corpus is built offline and deterministically on first use from the docstrings of
the Python standard library (English text present on every Python installation; files are
parsed with ``ast``, never imported), then cached.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
SAMPLE_CORPUS_VERSION = 2
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


def stdlib_documents(max_files: int | None = None) -> Iterator[str]:
    """One document per standard-library module: its module, class and function docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not (_SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts))
    )
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
        docstrings = [d for d in (ast.get_docstring(n) for n in nodes) if d]
        if docstrings:
            yield "\n\n".join(docstrings)


def default_cache_dir() -> Path:
    base = os.environ.get("ARGONNE_DT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "argonne_dt")
    return Path(base).expanduser()


def sample_corpus(cache_dir: str | Path | None = None, max_files: int | None = None) -> Path:
    """The directory of the sample corpus shards, built on first use (atomically: safe for many ranks)."""
    version = f"v{SAMPLE_CORPUS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
    suffix = f"-{max_files}" if max_files else ""
    target = Path(cache_dir or default_cache_dir()) / f"sample_corpus-{version}{suffix}"
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the sample corpus in {target} (once; stdlib docstrings)...", file=sys.stderr, flush=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        records = (_record(text, f"python-stdlib-doc/{i}", "python-stdlib-docstrings") for i, text in enumerate(stdlib_documents(max_files)))
        paths = write_shards(records, building, rows_per_shard=128, rows_per_row_group=32)
        (building / "COMPLETE").write_text(json.dumps({"shards": len(paths)}))
        try:
            os.rename(building, target)
        except OSError:  # another rank finished first; its copy is identical
            if not (target / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"sample corpus ready: {len(list(target.glob('*.parquet')))} shards", file=sys.stderr, flush=True)
    return target


def _read_inputs(paths: Iterable[str | Path], text_key: str) -> Iterator[dict]:
    for path in map(Path, paths):
        if path.suffix == ".parquet":
            table = pq.ParquetFile(path)
            if text_key not in table.schema_arrow.names:
                raise ValueError(f"{path}: no column {text_key!r} (columns: {', '.join(table.schema_arrow.names)})")
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
                        raise ValueError(f"{path}:{number}: expected a JSON object with a {text_key!r} field") from None
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

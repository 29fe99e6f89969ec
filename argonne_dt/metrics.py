"""The package's rank-aware logger; console lines, TensorBoard scalars, metrics.jsonl; tokens/s, MFU and memory."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def is_rank_zero() -> bool:
    """Whether this process speaks for the run: rank 0 of the process group, or a process without one."""
    return not dist.is_initialized() or dist.get_rank() == 0


# ``extra=`` of a record that every rank has its own of (a signal it received): said on every rank.
EVERY_RANK = {"every_rank": True}


class _Console(logging.Handler):
    """Information as it is, on stdout; warnings and errors on stderr, with level and source. The
    streams are looked up per record, as ``print`` does, so a redirected or captured stdout gets them.

    Rank 0 alone says information (``EVERY_RANK`` lets a record through on every rank); every rank
    says its warnings.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if is_rank_zero() or getattr(record, "every_rank", False):
            return True
        return record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"{record.levelname} {record.name}: {record.getMessage()}"
            else:
                stream, text = sys.stdout, record.getMessage()
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


def logger(name: str) -> logging.Logger:
    """The logger of module ``name`` of the package; every one writes through the package's console."""
    package = logging.getLogger(__package__)
    if not any(isinstance(handler, _Console) for handler in package.handlers):
        package.addHandler(_Console())
        package.setLevel(logging.INFO)
    return logging.getLogger(name)


log = logger(__name__)

# Longest text (a sample) on one console line.
CONSOLE_TEXT_CHARS = 200

# Dense bf16 peak per device, FLOP/s (vendor figures, no sparsity).
PEAK_BF16_FLOPS = {
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
    "l40s": 362e12,
    "a10g": 125e12,
}


@functools.lru_cache(maxsize=2)
def measured_cpu_peak_flops(dtype: torch.dtype = torch.bfloat16, size: int = 512, repeats: int = 3) -> float:
    """What this CPU process does in a matmul of ``dtype``: the CPU's 'peak' for MFU (measured once
    per process and dtype; small, because CPUs without native bf16 take seconds for a large one)."""
    # Its own generator: the run's (checkpointed) random state must not depend on this measurement.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, generator=generator)
    b = torch.randn(size, size, dtype=dtype, generator=generator)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak FLOP/s of one device: the known bf16 figure for GPUs, a measured matmul of the run's
    compute dtype on CPU (where bf16 may be much slower than fp32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
        return 312e12
    return measured_cpu_peak_flops(dtype)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class PeakTensorBytes(TorchDispatchMode):
    """Tensor storage that operators create while the mode is active, followed until freed: ``peak``
    (the most bytes alive at once, checked after every op: what a CUDA allocator's peak counts, on any
    device; the CPU's resident set adds the heap's fragmentation), ``largest`` (one storage) and
    ``live_bytes()`` at any moment. The storages of ``existing`` tensors are not counted.

    A storage is followed by a weak reference to the storage itself (``StorageWeakRef``), so one freed
    and another created at its address are two storages. Under DTensor the mode sees DTensor's
    operators (their local results' storages); with ``local_operators`` (a subclass's class attribute)
    it sees the local operators instead (DTensor unwraps first, as ``CommDebugMode`` lets it), the
    temporaries and collectives inside DTensor's ops included.
    ``sizes`` maps a dimension's measured length to the length it stands for: a storage is counted at
    the bytes its tensor would have at that shape. Each storage carries the ``tag`` set when it was
    created (``tag_of`` may choose another).
    """

    def __init__(self, *existing: torch.Tensor, sizes: dict[int, int] | None = None):
        super().__init__()
        self.existing = {StorageWeakRef(local_tensor(t).untyped_storage()).cdata for t in existing}
        self.sizes = sizes or {}
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.tag = "other"
        self.peak = self.largest = 0

    local_operators = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.local_operators and any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tag = self.tag_of(func, args, kwargs)
        self._drop_freed()
        # A view or an in-place result shares an input's storage: nothing new, wherever that input came from.
        inputs = {_storage_key(local_tensor(t)) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and _storage_key(local_tensor(tensor)) not in inputs:
                self._follow(local_tensor(tensor), tag)
        self.peak = max(self.peak, self._sum())
        return out

    def tag_of(self, func, args, kwargs) -> str:
        return self.tag

    def _follow(self, tensor: torch.Tensor, tag: str) -> None:
        try:
            storage = tensor.untyped_storage()
        except RuntimeError:  # a collective's result under the fake process group has no storage
            return
        ref = StorageWeakRef(storage)
        if ref.cdata in self.existing or ref.cdata in self.live or not storage.nbytes():
            return
        size = storage.nbytes()
        if self.sizes and size == tensor.numel() * tensor.element_size():
            size = tensor.element_size() * math.prod(self.sizes.get(n, n) for n in tensor.shape)
        self.live[ref.cdata] = (ref, size, tag)
        self.largest = max(self.largest, size)

    def _drop_freed(self) -> None:
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}

    def _sum(self, tag: str | None = None) -> int:
        return sum(size for _, size, kept in self.live.values() if tag is None or kept == tag)

    def live_bytes(self, tag: str | None = None) -> int:
        """Bytes alive now (of storages tagged ``tag``, or all)."""
        self._drop_freed()
        return self._sum(tag)

    def is_followed(self, tensor: torch.Tensor, tag: str | None = None) -> bool:
        """Whether ``tensor``'s storage is one created under the mode and alive (tagged ``tag``)."""
        entry = self.live.get(StorageWeakRef(local_tensor(tensor).untyped_storage()).cdata)
        return entry is not None and not entry[0].expired() and (tag is None or entry[2] == tag)

    def mark(self) -> int:
        """Restart the peak from the current level; returns that level."""
        self.peak = self.live_bytes()
        return self.peak


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return StorageWeakRef(tensor.untyped_storage()).cdata
    except RuntimeError:  # a collective's result under the fake process group has no storage
        return None


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class LogWindow:
    """The steps since the previous log line: the mean of each loss term and of the grad norm, and their rate.

    Every step of a run trains on the same number of tokens, so the mean of the steps' losses
    (each already the mean over its micro-batches and dp ranks) weights every token equally.
    Steps whose loss or norm was not finite (skipped updates) are left out of the means.
    The window is checkpointed: the first line after a resume means the same steps as the line of
    an uninterrupted run, those before the checkpoint included.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.timed_steps = 0  # the steps since ``started`` (a resumed window's earlier steps are not)
        self.losses: dict[str, list[float]] = {}
        self.grad_norms: list[float] = []

    def add(self, losses: dict[str, float], grad_norm: float) -> None:
        self.steps += 1
        self.timed_steps += 1
        if all(math.isfinite(v) for v in losses.values()) and math.isfinite(grad_norm):
            for name, value in losses.items():
                self.losses.setdefault(name, []).append(value)
            self.grad_norms.append(grad_norm)

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.started) / max(self.timed_steps, 1)

    def means(self) -> dict[str, float]:
        if not self.grad_norms:
            return {"loss": math.nan, "grad_norm": math.nan, "grad_norm_max": math.nan}
        return {**{name: sum(values) / len(values) for name, values in self.losses.items()},
                "grad_norm": sum(self.grad_norms) / len(self.grad_norms), "grad_norm_max": max(self.grad_norms)}

    def state_dict(self) -> dict:
        """The same on every rank (the values are averaged over ranks): written once."""
        return {"steps": self.steps, "losses": self.losses, "grad_norms": self.grad_norms}

    def load_state_dict(self, entries: dict) -> None:
        """The window a checkpoint held (empty from a checkpoint without one); the rate is measured anew."""
        self.reset()
        self.steps = entries.get("steps", 0)
        self.losses = entries.get("losses", {})
        self.grad_norms = entries.get("grad_norms", [])


def eta_seconds(step: int, total: int, seconds_per_step: float) -> float:
    """Time left at the recent step rate."""
    return max(total - step, 0) * seconds_per_step


def duration(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``6s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_text(step: int, total: int, elapsed_s: float, seconds_per_step: float) -> str:
    """``step 10/300 (3.3%) | 1m02s elapsed | eta 29m10s``: the head of a console line."""
    return (f"step {step}/{total} ({100 * step / total:.1f}%) | {duration(elapsed_s)} elapsed | "
            f"eta {duration(eta_seconds(step, total, seconds_per_step))}")


class ProgressReporter:
    """Progress of a long tool: a redrawn bar on a terminal, a plain line every ``every_s`` seconds
    (and at the end) when the output is a log file."""

    def __init__(self, total: int | None, what: str, unit: str = "", stream=None, every_s: float = 30.0):
        """``total=None``: an unknown amount (counts and elapsed time only; ``finish()`` ends the line)."""
        self.total, self.what, self.unit = (max(total, 1) if total is not None else None), what, unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.started = self._last = time.perf_counter()

    def advance(self, count: int = 1) -> None:
        self.done += count
        self._show(finished=self.total is not None and self.done >= self.total)

    def finish(self) -> None:
        """End an open-ended report (a known total ends by itself)."""
        if self.total is None:
            self._show(finished=True)

    def _show(self, finished: bool) -> None:
        now = time.perf_counter()
        if self.tty:
            bar = ""
            if self.total is not None:
                filled = int(30 * min(self.done, self.total) / self.total)
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] "
            self.stream.write(f"\r{self.what} {bar}{self._counts(now)}")
            if finished:
                self.stream.write("\n")
            self.stream.flush()
        elif finished or now - self._last >= self.every_s:
            print(f"{self.what}: {self._counts(now)}", file=self.stream, flush=True)
            self._last = now

    def _counts(self, now: float) -> str:
        elapsed = now - self.started
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            return f"{self.done}{unit}, {duration(elapsed)} elapsed"
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.done}/{self.total}{unit} ({100 * min(self.done, self.total) / self.total:.0f}%), "
                f"{duration(elapsed)} elapsed, eta {duration(eta)}")


class MetricsLogger:
    """Writes on rank 0 only: a console line, TensorBoard events under ``tb/`` and ``metrics.jsonl``."""

    def __init__(self, job_dir: str | Path, tensorboard: bool, enabled: bool, resume_step: int = 0):
        """``resume_step``: the step the run continues from; records of later steps (written before
        a crash or a stop, and about to be repeated) are removed from ``metrics.jsonl`` and purged
        from TensorBoard."""
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        job_dir = Path(job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        path = job_dir / "metrics.jsonl"
        if path.exists():
            _drop_records_after(path, resume_step)
        self.jsonl = path.open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(job_dir / "tb"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict[str, float], section: str = "train", head: str | None = None) -> None:
        """One console line (``head`` first, e.g. ``progress_text``), the scalars in TensorBoard and a jsonl record."""
        if not self.enabled:
            return
        line = " | ".join(f"{k} {_fmt(v)}" for k, v in scalars.items())
        log.info(f"{head or f'step {step:>7}'} | {line}")
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{section}/{key}", value, step)
            if "loss" in scalars and "tokens_seen" in scalars:
                # The picture the original project published: loss against tokens.
                self.writer.add_scalar("train/loss_vs_tokens", scalars["loss"], int(scalars["tokens_seen"]))

    def text(self, step: int, tag: str, text: str) -> None:
        """A text (a sample): one line on the console (``one_line``); as it is in metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        log.info(f"step {step:>7} | {tag}: {one_line(text)}")
        self.jsonl.write(json.dumps({"step": step, tag: text}) + "\n")
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def one_line(text: str, limit: int = CONSOLE_TEXT_CHARS) -> str:
    """``text`` for one console line: a run of whitespace with a newline in it becomes ``\\n``, any other
    run one space, and more than ``limit`` characters are cut (ending in ``...``), never inside a ``\\n``."""
    text = re.sub(r"\s+", lambda run: "\\n" if "\n" in run.group() else " ", text)
    if len(text) <= limit:
        return text
    cut = limit - 3
    if text[cut - 1 : cut + 1] == "\\n":
        cut -= 1
    return text[:cut] + "..."


def _drop_records_after(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step``; the file is replaced whole, so a crash leaves one or the other."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    if abs(value) >= 100 or value == 0:
        return f"{value:.1f}"
    return f"{value:.4g}"

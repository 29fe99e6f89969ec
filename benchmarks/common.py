"""What the benchmark scripts share: random token batches, peak memory of a step, the JSON output."""

import ctypes
import json
import threading

import torch


def random_micro_batches(vocab_size: int, micro_batch_size: int, seq_len: int, count: int, seed: int = 0,
                         device: torch.device | str = "cpu") -> list[dict]:
    """``count`` micro-batches ``{"input", "target"}`` of uniformly random tokens, as the trainer gets them."""
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = []
    for _ in range(count):
        window = torch.randint(0, vocab_size, (micro_batch_size, seq_len + 1), generator=generator, device=device)
        batches.append({"input": window[:, :-1], "target": window[:, 1:]})
    return batches


def emit_json(data, path: str | None) -> None:
    """A benchmark's results: one JSON line on stdout, and the same, indented, in ``path`` if given."""
    print(json.dumps(data, default=str))
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)


_PAGE = 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Peak resident memory above the starting level, sampled every millisecond during a block."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.delta = self.peak - self.start

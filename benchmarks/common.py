"""What the benchmark scripts share: random token batches and the JSON output."""

import json

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

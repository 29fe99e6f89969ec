"""Which SDPA kernel runs for the 4b9 attention shapes, head_dim 170 as it is and padded to 176,
and how long each takes: training (forward + backward), no-grad evaluation, and generation (a
masked prefill of left-padded prompts, and one decoded token against a KV cache; an unmasked prefill is
the no-grad evaluation case).

    python3 benchmarks/gpu_attention_check.py [--tp 8] [--batch 4] [--seq 4096] [--repeats 5]
    python3 benchmarks/gpu_attention_check.py --device cpu --seq 64 --batch 1 --repeats 1   # smoke test

Prints one JSON line per case: the case, the head width, the kernels the profiler saw (ATen's
``_scaled_dot_product_*`` ops of forward and backward: flash, efficient, cudnn or math; the math
kernel's backward has no op of its own, so a backward without any of the others is reported as math)
and the median time in milliseconds. Needs only torch (run it with no PYTHONPATH); ``check_attention``
is the function for ``benchmarks/gpu_check.py`` to call.

Padding zero-fills q, k and v to a multiple of 8 (the model's ``pad_head_dim``) and keeps the scale
of the true head_dim, as ``argonne_dt.model.Attention`` does. ATen pads for the flash kernel itself
(a copy per call); the memory-efficient and cuDNN kernels need the multiple of 8, and a mask rules
flash out, so masked attention at 170 is expected to fall back to the math kernel (T x T scores in
memory). Not yet measured on a GPU: this script is the measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

HEADS, KV_HEADS, HEAD_DIM = 24, 8, 170  # the 4b9 model
KERNELS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
           "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math"}


def kernels_seen(run, backward: bool) -> dict:
    """The SDPA kernels of ``run()``'s forward (and backward), named from the profiler's ATen ops.
    The math kernel is a composite of plain ops: its backward has no op of its own."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
    names = {event.key for event in prof.key_averages()}
    seen = {"forward": set(), "backward": set()}
    for kernel, op in KERNELS.items():
        for name in names:
            if op in name:
                seen["backward" if name.endswith("_backward") else "forward"].add(kernel)
    return {"forward": sorted(seen["forward"]) or ["none"],
            "backward": (sorted(seen["backward"]) or ["math"]) if backward else []}


def median_ms(run, device: torch.device, repeats: int) -> float:
    run()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 3)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[-1])) if width > x.shape[-1] else x


def _inputs(batch, heads, kv_heads, q_len, kv_len, width, device, dtype, grad):
    def make(h, t):
        x = torch.randn(batch, h, t, HEAD_DIM, device=device, dtype=dtype)
        return _pad(x, width).requires_grad_(grad)
    return make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


def check_attention(device: torch.device, tp: int = 8, batch: int = 4, seq: int = 4096, repeats: int = 5,
                    dtype: torch.dtype | None = None) -> list[dict]:
    """One record per (case, head width): the kernels seen and the median time; a failing case
    carries its error instead."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    heads, kv_heads = HEADS // tp, KV_HEADS // tp
    scale = 1.0 / math.sqrt(HEAD_DIM)
    records = []
    for width in (HEAD_DIM, HEAD_DIM + (-HEAD_DIM % 8)):
        def attention(q, k, v, mask=None, causal=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                  scale=scale, enable_gqa=True)

        def training():
            q, k, v = _inputs(batch, heads, kv_heads, seq, seq, width, device, dtype, grad=True)
            attention(q, k, v)[..., :HEAD_DIM].sum().backward()

        def evaluation():
            with torch.no_grad():
                attention(*_inputs(batch, heads, kv_heads, seq, seq, width, device, dtype, grad=False))

        # Left-padded prompts: a boolean (B, 1, T, T) mask, causal and hiding each row's first 8 positions.
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        real = torch.arange(seq, device=device)[None, :] >= torch.tensor([0, 8] * (batch // 2) + [0] * (batch % 2),
                                                                          device=device)[:, None]
        padded_mask = (causal & real[:, None, None, :]) | torch.eye(seq, dtype=torch.bool, device=device)

        def prefill_masked():
            with torch.no_grad():
                attention(*_inputs(batch, heads, kv_heads, seq, seq, width, device, dtype, grad=False), mask=padded_mask)

        def decode_one_token():
            with torch.no_grad():
                attention(*_inputs(batch, heads, kv_heads, 1, seq, width, device, dtype, grad=False), causal=False)

        # No-grad evaluation is also the prefill of prompts of one length (no mask).
        cases = {"train_fwd_bwd": training, "eval_no_grad": evaluation, "generate_prefill_masked": prefill_masked,
                 "generate_decode_token": decode_one_token}
        for case, run in cases.items():
            record = {"check": "attention_kernels", "case": case, "head_width": width, "padded": width != HEAD_DIM,
                      "dtype": str(dtype).removeprefix("torch."), "tp": tp, "batch": batch, "seq": seq}
            try:
                record.update(kernels=kernels_seen(run, backward=run is training),
                              median_ms=median_ms(run, device, repeats))
            except Exception as err:  # noqa: BLE001 - reported per case, the other cases still run
                record["error"] = f"{type(err).__name__}: {err}"[:300]
            records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel degree: heads per GPU are 24/tp and 8/tp")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for record in check_attention(torch.device(args.device), args.tp, args.batch, args.seq, args.repeats):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

"""One-GPU check of the 4b9 layer shapes: training tokens/s, MFU and peak memory, padded vs unpadded
attention (head_dim 170 -> 176), plus the attention kernel alone. Prints one JSON object.

    python3 benchmarks/gpu_check.py [--layers 12] [--micro-batch 2] [--seq 4096] [--steps 8]
    python3 benchmarks/gpu_check.py --device cpu --layers 1 --seq 128 --micro-batch 1 --steps 1   # smoke test

Only the model, the fused loss and AdamW run here (no data pipeline: random tokens), so the
script needs nothing beyond torch on the GPU machine.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from argonne_dt.config import load_config
from argonne_dt.metrics import peak_flops
from argonne_dt.model import ArgonneModel


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(cfg, device, micro_batch: int, seq: int, steps: int, warmup: int) -> dict:
    with torch.device("meta"):
        model = ArgonneModel(cfg.model)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device=device).manual_seed(0)
    times = []
    for index in range(warmup + steps):
        w = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq + 1), device=device, generator=g)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(w[:, :-1], targets=w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    tokens_per_s = micro_batch * seq / median
    result = {
        "pad_head_dim": cfg.model.pad_head_dim, "layers": cfg.model.num_layers, "micro_batch": micro_batch,
        "seq_len": seq, "step_s": median, "tokens_per_s": tokens_per_s,
        "mfu": model.flops_per_token(seq) * tokens_per_s / peak_flops(device),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": loss.item(),
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def attention_rate(device, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, pad: bool, repeats: int = 10) -> dict:
    """Forward + backward of causal GQA attention alone, with head_dim padded to a multiple of 8 or not."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width = head_dim + (-head_dim % 8 if pad else 0)
    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)

    def run():
        qp, kp, vp = (F.pad(t, (0, width - head_dim)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=head_dim**-0.5, enable_gqa=True)
        out[..., :head_dim].sum().backward()

    run()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    elapsed = (time.perf_counter() - start) / repeats
    flops = 4 * batch * heads * seq * seq * head_dim * 3.5 / 2  # fwd + bwd (2.5x fwd), causal half
    return {"pad": pad, "head_dim_used": width, "ms": elapsed * 1e3, "tflops": flops / elapsed / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "attention": [], "training": []}
    for pad in (False, True):
        report["attention"].append(attention_rate(device, args.micro_batch, args.seq, 24, 8, 170, pad))
    for pad in (False, True):
        cfg = load_config("4b9.toml", [f"--model.num_layers={args.layers}", f"--model.pad_head_dim={str(pad).lower()}",
                                       "--parallel.tp=1", f"--data.seq_len={args.seq}"])
        report["training"].append(train_rate(cfg, device, args.micro_batch, args.seq, args.steps, args.warmup))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

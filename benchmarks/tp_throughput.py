"""Training-step throughput for several tensor-parallel degrees: tokens/s, MFU, memory, comm share.

    torchrun --nproc-per-node 2 benchmarks/tp_throughput.py --config tiny.toml --tp 1 2 [--json out.json]
    torchrun --nproc-per-node 8 benchmarks/tp_throughput.py --config 4b9.toml --tp 8 --steps 10

Each degree runs the real step (forward, backward, global clip, AdamW) on random tokens over all
ranks (dp = world / tp), warm-up steps excluded. Peak memory is the CUDA allocator's peak per
config, or on CPU the process's max RSS so far (it only grows across configs). The communication
share is the time spent in c10d collectives during one profiled step.
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from common import emit_json, random_micro_batches

from argonne_dt.config import load_config
from argonne_dt.distributed import build_layout, compute_dtype, init_distributed, mixed_precision
from argonne_dt.metrics import peak_flops, peak_memory_gib
from argonne_dt.optim import build_optimizer
from argonne_dt.parallelize import build_model
from argonne_dt.step import train_step

_COLLECTIVES = ("c10d::", "nccl:", "gloo:", "allreduce", "all_reduce", "reduce_scatter", "all_gather", "allgather")


def _comm_share(step_fn, device) -> float:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step_fn()
    wall_us = (time.perf_counter() - start) * 1e6
    comm_us = 0.0
    for event in prof.key_averages():
        if any(key in event.key.lower() for key in _COLLECTIVES):
            device_us = getattr(event, "device_time_total", 0) or 0
            comm_us += device_us if device.type == "cuda" and device_us else event.cpu_time_total
    return min(1.0, comm_us / wall_us)


def measure(config: str, overrides: list[str], tp: int, steps: int, warmup: int, device) -> dict:
    cfg = load_config(config, overrides + [f"--parallel.tp={tp}", "--parallel.dp=-1"])
    layout = build_layout(cfg.parallel, device.type)
    dtype = compute_dtype(cfg, device)
    model = build_model(cfg.model, layout, device, cfg.train.seed, dtype)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    autocast = mixed_precision(dtype, device)
    accum = cfg.train.grad_accum_steps
    singles = random_micro_batches(cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len,
                                   (warmup + steps + 1) * accum, seed=1000 + layout.dp_rank)
    batches = [singles[i : i + accum] for i in range(0, len(singles), accum)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index, micro in enumerate(batches[:-1]):
        dist.barrier()
        start = time.perf_counter()
        train_step(model, optimizer, micro, device, autocast, cfg.optim.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    share = _comm_share(lambda: train_step(model, optimizer, batches[-1], device, autocast, cfg.optim.grad_clip), device)
    memory = torch.tensor(peak_memory_gib(device), device=device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * layout.dp
    median = statistics.median(times)
    tokens_per_s = tokens_per_step / median
    return {
        "config": config, "tp": tp, "dp": layout.dp, "world": layout.world_size, "device": str(device.type),
        "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / layout.world_size,
        # Against the peak of the run's compute dtype (on CPU a matmul measured once, cached).
        "mfu": model.flops_per_token(cfg.data.seq_len) * tokens_per_s / (peak_flops(device, dtype) * layout.world_size),
        "peak_memory_gib_max_rank": memory.item(), "comm_share": share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny.toml")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args, overrides = parser.parse_known_args()
    device = init_distributed()
    rows = [measure(args.config, overrides, tp, args.steps, args.warmup, device) for tp in args.tp]
    if dist.get_rank() == 0:
        print(f"{'tp':>3} {'dp':>3} {'tokens/s':>10} {'/rank':>8} {'step s':>8} {'min-max':>13} {'MFU':>6} "
              f"{'mem GiB':>8} {'comm':>5}")
        for r in rows:
            print(f"{r['tp']:>3} {r['dp']:>3} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_rank']:>8,.0f} "
                  f"{r['step_s_median']:>8.3f} {r['step_s_min']:>6.3f}-{r['step_s_max']:<6.3f} {r['mfu']:>6.1%} "
                  f"{r['peak_memory_gib_max_rank']:>8.2f} {r['comm_share']:>5.0%}")
        emit_json(rows, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

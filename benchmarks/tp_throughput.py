"""Training-step throughput for several tensor-parallel degrees: tokens/s, MFU, memory, comm share.

    torchrun --nproc-per-node 2 benchmarks/tp_throughput.py --config tiny.toml --tp 1 2 [--json out.json]
    torchrun --nproc-per-node 8 benchmarks/tp_throughput.py --config 4b9.toml --tp 8 --steps 10
    torchrun --nproc-per-node 2 benchmarks/tp_throughput.py --config tiny.toml --tp 2 --loss logits fused

Each degree runs the real step (forward, backward, global clip, AdamW) on random tokens over all
ranks (dp = world / tp), with the run's gradient accumulation (``train.global_batch_size`` or
``train.grad_accum_steps``, as the layout computes it) and model transforms (activation
checkpointing, compile), warm-up steps excluded. Peak memory is the CUDA allocator's peak per
config, or on CPU the process's max RSS so far (it only grows across configs). The communication
share is the time spent in c10d collectives during one profiled step.

``--loss`` names the loss paths to compare side by side: ``fused`` (``train.loss_chunk_tokens``: the
chunked fused loss, vocab-parallel under tp) and ``logits`` (full logits, then cross-entropy under
``loss_parallel()``: the loss before the fused one existed under tp). Their models start from the
same weights and take their steps in turn on the same batches. For each: the loss's own peak (the
most tensor bytes alive at once in its forward and backward from the final hidden states of one
micro-batch, the weight's gradient included) and the step's peak above the level before it (CUDA:
the allocator's peak; CPU: the resident set, freed heap returned first).
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from common import PeakRss, emit_json, random_micro_batches

from argonne_dt.config import load_config
from argonne_dt.distributed import compute_dtype, init_distributed, mixed_precision, run_layout
from argonne_dt.loss import loss_context
from argonne_dt.metrics import PeakTensorBytes, peak_flops, peak_memory_gib
from argonne_dt.optim import build_optimizer
from argonne_dt.parallelize import ModelTransforms, build_model
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


def _peak_bytes(fn, device) -> int:
    """Bytes above the level before ``fn()`` at its peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakRss() as rss:
        fn()
    return rss.delta


def _loss_alone(model, batch, device, autocast, layout) -> int:
    """Peak tensor bytes of the loss's forward and backward (the weight's gradient included) from one
    micro-batch's final hidden states; without FSDP, whose lm_head is whole only inside the forward."""
    with autocast, loss_context(layout):
        with torch.no_grad():
            hidden = model(batch["input"].to(device), head=lambda m, h, t: h)
        hidden.requires_grad_()
        model.zero_grad(set_to_none=True)
        with PeakTensorBytes(hidden, *model.parameters()) as tracker:
            model.loss_from_hidden(hidden, batch["target"].to(device)).backward()
    model.zero_grad(set_to_none=True)
    return tracker.peak


def measure(config: str, overrides: list[str], tp: int, steps: int, warmup: int, device, losses: list[str]) -> list[dict]:
    cfg = load_config(config, overrides + [f"--parallel.tp={tp}", "--parallel.dp=-1"])
    layout = run_layout(cfg, device.type)
    dtype = compute_dtype(cfg, device)
    models = {}
    for loss in losses:  # the same initial weights
        models[loss] = build_model(cfg.model, layout, device, cfg.train.seed, dtype,
                                   transforms=ModelTransforms.of(cfg.parallel))
        models[loss].use_loss_path(fused_chunk=cfg.train.loss_chunk_tokens if loss == "fused" else 0)
    optimizers = {loss: build_optimizer(model, cfg.optim, device.type) for loss, model in models.items()}
    autocast = mixed_precision(dtype, device)
    accum = layout.grad_accum_steps
    singles = random_micro_batches(cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len,
                                   (warmup + steps + 1) * accum, seed=1000 + layout.dp_rank)
    batches = [singles[i : i + accum] for i in range(0, len(singles), accum)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {loss: [] for loss in losses}
    step_peaks = {loss: [] for loss in losses}
    for index, micro in enumerate(batches[:-1]):
        for loss, model in models.items():  # in turn, on the same batch
            dist.barrier()
            start = time.perf_counter()
            step_peaks[loss].append(_peak_bytes(
                lambda: train_step(model, optimizers[loss], micro, device, autocast, cfg.optim.grad_clip, layout), device))
            if index >= warmup:
                times[loss].append(time.perf_counter() - start)
    rows = []
    for loss, model in models.items():
        share = _comm_share(lambda: train_step(model, optimizers[loss], batches[-1], device, autocast,
                                               cfg.optim.grad_clip, layout), device)
        loss_peak = _loss_alone(model, batches[-1][0], device, autocast, layout) if layout.dp == 1 else float("nan")
        memory = torch.tensor([peak_memory_gib(device), loss_peak / 2**20,
                               statistics.median(step_peaks[loss][warmup:]) / 2**20], device=device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        median = statistics.median(times[loss])
        tokens_per_s = layout.tokens_per_step / median
        rows.append({
            "config": config, "tp": tp, "dp": layout.dp, "world": layout.world_size, "device": str(device.type),
            "dtype": str(dtype).removeprefix("torch."), "loss": loss,
            "micro_batches": accum,
            "loss_chunk_tokens": cfg.train.loss_chunk_tokens if loss == "fused" else 0,
            "step_s_median": median, "step_s_min": min(times[loss]), "step_s_max": max(times[loss]),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / layout.world_size,
            # Against the peak of the run's compute dtype (on CPU a matmul measured once, cached).
            "mfu": model.flops_per_token(cfg.data.seq_len) * tokens_per_s / (peak_flops(device, dtype) * layout.world_size),
            "peak_memory_gib_max_rank": memory[0].item(), "loss_peak_mib_max_rank": memory[1].item(),
            "step_peak_mib_max_rank": memory[2].item(), "comm_share": share,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny.toml")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss", nargs="+", choices=["fused", "logits"], default=["fused"],
                        help="loss paths, measured side by side (see above)")
    parser.add_argument("--json", help="also write the rows here")
    args, overrides = parser.parse_known_args()
    device = init_distributed()
    rows = [row for tp in args.tp for row in measure(args.config, overrides, tp, args.steps, args.warmup, device,
                                                     args.loss)]
    if dist.get_rank() == 0:
        print(f"{'tp':>3} {'dp':>3} {'loss':>6} {'tokens/s':>10} {'/rank':>8} {'step s':>8} {'min-max':>13} {'MFU':>6} "
              f"{'mem GiB':>8} {'loss MiB':>9} {'step MiB':>9} {'comm':>5}")
        for r in rows:
            print(f"{r['tp']:>3} {r['dp']:>3} {r['loss']:>6} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_rank']:>8,.0f} "
                  f"{r['step_s_median']:>8.3f} {r['step_s_min']:>6.3f}-{r['step_s_max']:<6.3f} {r['mfu']:>6.1%} "
                  f"{r['peak_memory_gib_max_rank']:>8.2f} {r['loss_peak_mib_max_rank']:>9.0f} "
                  f"{r['step_peak_mib_max_rank']:>9.0f} {r['comm_share']:>5.0%}")
        emit_json(rows, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The one-GPU check: the CUDA paths the CPU tests cannot reach, and what the plan predicts for this GPU.

    python3 benchmarks/gpu_check.py [--gpu h200-141gb] [--layers 4] [--seq 4096]
    python3 benchmarks/gpu_check.py --device cpu --small   # every check on tiny shapes (the CPU test)

Each check runs in a process of its own and prints one JSON line as it finishes (``{"check": name,
"pass": ..., "seconds": ...}``); it has a time budget: a check that runs over it (a hang in a CUDA
synchronization or an NCCL collective included) has its process killed, is reported, and the next
one starts. The outer ``timeout`` of ``gpu_check.sh`` bounds the whole run. Checks:
- ``train_bf16``: bf16 autocast steps with fused AdamW and the padded head_dim; the loss falls, and
  the profiler names the attention kernel that ran (flash or memory-efficient expected);
- ``kv_cache_bf16``: greedy decoding with a bf16 KV cache equals full recomputation;
- ``dcp_roundtrip_sync`` / ``dcp_roundtrip_async``: model + optimizer through DCP and back, bit for bit;
- ``compile``: the blocks under torch.compile give the eager loss and gradients (skipped, with the
  reason, where no C compiler is found: inductor needs one);
- ``memory_<mode>``: the peak of a training step of ``--layers`` 4b9 blocks at the real vocabulary
  for each checkpoint mode, above the weights and optimizer state, against the planner's
  (``argonne_dt.memory_plan``: gradients, measured activations, autocast copies, the loss's transient);
- ``step_time``: the step's time against the planner's compute time at the assumed matmul efficiency
  (the measured efficiency is printed);
- ``collectives``: with more than one GPU, all-gather and reduce-scatter bus bandwidth over NVLink
  against the planner's assumed link bandwidth (skipped on one GPU).
The DCP and compile checks use a reduced vocabulary, so they take seconds. Only torch, numpy and this
package are imported (random tokens; no data pipeline, tokenizer or Hugging Face libraries).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace

import torch
from common import random_micro_batches

from argonne_dt.checkpoint import ModelOptimizerState
from argonne_dt.config import load_config
from argonne_dt.distributed import mixed_precision
from argonne_dt.generate import SamplingConfig, generate
from argonne_dt.optim import build_optimizer
from argonne_dt.parallelize import apply_activation_checkpointing, build_model, compile_blocks
from argonne_dt.step import accumulate_gradients, train_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model, cfg, device):
    return build_optimizer(model, cfg.optim, device.type)


def _step(model, optimizer, batch, cfg) -> float:
    device = batch["input"].device
    return train_step(model, optimizer, [batch], device, mixed_precision(torch.bfloat16, device), cfg.optim.grad_clip,
                      None).loss


def _batch(cfg, device, batch, seq, seed=0) -> dict:
    return random_micro_batches(cfg.model.vocab_size, batch, seq, 1, seed, device)[0]


def check_train_bf16(cfg, device, batch, seq) -> dict:
    """Repeated steps on one batch: the loss must fall; the profiler says which SDPA kernel ran."""
    model = build_model(cfg.model, device=device, seed=0)
    optimizer = _optimizer(model, cfg, device)
    tokens = _batch(cfg, device, batch, seq)
    losses = [_step(model, optimizer, tokens, cfg) for _ in range(3)]
    from torch.profiler import profile

    with profile() as prof:
        losses.append(_step(model, optimizer, tokens, cfg))
    kernels = sorted({e.key for e in prof.key_averages()
                      if "scaled_dot_product" in e.key or "flash" in e.key.lower() or "efficient" in e.key.lower()})
    fused_kernel = any("flash" in k.lower() or "efficient" in k.lower() or "cudnn" in k.lower() for k in kernels)
    fused_adamw = any(g.get("fused") for g in optimizer.param_groups)
    return {"pass": losses[-1] < losses[0] and fused_adamw and (fused_kernel or device.type != "cuda"),
            "losses": losses, "attention_kernels": kernels, "fused_attention": fused_kernel, "fused_adamw": fused_adamw}


def c_compiler() -> str | None:
    """The C compiler inductor would use (``CC``, else cc / gcc / clang on PATH), or None."""
    return next((found for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name
                 for found in [shutil.which(name)] if found), None)


def check_compile(cfg, device, batch, seq) -> dict:
    compiler = c_compiler()
    if compiler is None:
        return {"pass": None, "skipped": "no C compiler (CC, cc, gcc or clang): torch.compile's inductor needs one"}
    eager = build_model(cfg.model, device=device, seed=0)
    compiled = build_model(cfg.model, device=device, seed=0)
    compile_blocks(compiled)
    tokens = _batch(cfg, device, batch, seq, seed=1)
    results = []
    for model in (eager, compiled):
        loss = accumulate_gradients(model, [tokens], device, mixed_precision(torch.bfloat16, device), None)["loss"]
        results.append((loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    grad_error = ((compiled_grad - eager_grad).norm() / eager_grad.norm()).item()
    loss_error = abs(compiled_loss - eager_loss)
    return {"pass": loss_error < 2e-2 and grad_error < 5e-2, "compiler": compiler, "loss_error": loss_error,
            "grad_rel_error": grad_error}


def check_kv_cache(cfg, device) -> dict:
    model = build_model(cfg.model, device=device, seed=0).eval()
    prompt = _batch(cfg, device, 1, 15, seed=2)["input"][0].tolist()
    greedy = SamplingConfig(max_new_tokens=16, temperature=0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        cache_dtypes = sorted({str(c.keys.dtype) for c in model.new_kv_caches(1, 8)})
        cached = generate(model, [prompt], greedy)[0]
        recomputed = generate(model, [prompt], greedy, recompute=True)[0]
    # bf16 rounding differs between one-token and whole-sequence attention: allow a late divergence.
    agree = next((i for i, (a, b) in enumerate(zip(cached, recomputed)) if a != b), len(cached))
    return {"pass": cache_dtypes == ["torch.bfloat16"] and agree >= 8, "cache_dtypes": cache_dtypes,
            "tokens_equal_before_divergence": agree, "of": len(cached)}


def check_dcp(cfg, device, batch, seq, asynchronous: bool) -> dict:
    import torch.distributed.checkpoint as dcp

    model = build_model(cfg.model, device=device, seed=0)
    optimizer = _optimizer(model, cfg, device)
    _step(model, optimizer, _batch(cfg, device, batch, seq), cfg)
    restored = build_model(cfg.model, device=device, seed=9)
    restored_optimizer = _optimizer(restored, cfg, device)
    _step(restored, restored_optimizer, _batch(cfg, device, batch, seq, seed=3), cfg)  # optimizer state to overwrite
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        state = {"train": ModelOptimizerState(model, optimizer)}
        if asynchronous:
            dcp.async_save(state, checkpoint_id=directory, no_dist=True).result()
        else:
            dcp.save(state, checkpoint_id=directory, no_dist=True)
        saved_s = time.perf_counter() - started
        dcp.load({"train": ModelOptimizerState(restored, restored_optimizer)}, checkpoint_id=directory, no_dist=True)
    params_equal = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    moments_equal = all(torch.equal(optimizer.state[a][k], restored_optimizer.state[b][k])
                        for a, b in zip(model.parameters(), restored.parameters()) for k in ("exp_avg", "exp_avg_sq"))
    return {"pass": params_equal and moments_equal, "params_equal": params_equal,
            "optimizer_moments_equal": moments_equal, "save_s": saved_s}


def _planned_step_bytes(cfg, ac: str, batch: int, seq: int, device: torch.device) -> dict:
    """What the planner says a one-device step of ``cfg`` holds above weights and AdamW state."""
    from argonne_dt.memory_plan import local_parameter_count, measured_activations

    m = cfg.model
    acts = measured_activations(m, 1, False, ac, batch, seq, device.type)
    params = local_parameter_count(m, cfg.parallel, 1, 1)
    return {"gradients": 4 * params, "activations_kept": acts.embedding_kept + m.num_layers * acts.block_kept,
            "autocast_weight_copies": m.num_layers * acts.weight_copies_per_block,
            "transient_peak": max(acts.block_backward_peak, acts.loss_peak)}


def _measured_step_bytes(model, optimizer, batch, cfg, device) -> int:
    """Peak bytes of a (second, steady-state) training step above what is held before it."""
    _step(model, optimizer, batch, cfg)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(model, optimizer, batch, cfg)
        return torch.cuda.max_memory_allocated(device) - before
    from argonne_dt.metrics import PeakTensorBytes  # on CPU: every storage the step creates, followed

    recorder = PeakTensorBytes(*model.parameters())
    with recorder:
        _step(model, optimizer, batch, cfg)
    return recorder.peak


def check_memory(cfg, device, batch, seq, ac: str) -> dict:
    model = build_model(cfg.model, device=device, seed=0)
    apply_activation_checkpointing(model, ac, 0)
    optimizer = _optimizer(model, cfg, device)
    measured = _measured_step_bytes(model, optimizer, _batch(cfg, device, batch, seq), cfg, device)
    parts = _planned_step_bytes(cfg, ac, batch, seq, device)
    planned = sum(parts.values())
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"pass": abs(measured - planned) <= 0.1 * planned, "activation_checkpoint": ac, "layers": cfg.model.num_layers,
            "micro_batch": batch, "seq_len": seq, "measured_gib": measured / 2**30, "planned_gib": planned / 2**30,
            "measured_over_planned": measured / planned, "planned_parts_gib": {k: v / 2**30 for k, v in parts.items()}}


def check_step_time(cfg, device, batch: int, seq: int, steps: int, gpu: str | None) -> dict:
    from argonne_dt.memory_plan import GPUS
    from argonne_dt.metrics import peak_flops

    model = build_model(cfg.model, device=device, seed=0)
    optimizer = _optimizer(model, cfg, device)
    times = []
    for index in range(steps + 1):  # the first step warms up (allocator, cuBLAS heuristics)
        tokens = _batch(cfg, device, batch, seq, seed=index)
        _sync(device)
        start = time.perf_counter()
        _step(model, optimizer, tokens, cfg)
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    flops = model.flops_per_token(seq) * batch * seq
    peak = GPUS[gpu].peak_flops if gpu else peak_flops(device)
    efficiency = flops / step_s / peak
    result = {"layers": cfg.model.num_layers, "micro_batch": batch, "seq_len": seq, "step_s": step_s,
              "tokens_per_s": batch * seq / step_s, "measured_matmul_efficiency": efficiency, "peak_flops": peak}
    if gpu:
        assumed = GPUS[gpu].matmul_efficiency
        result.update({"gpu": gpu, "assumed_matmul_efficiency": assumed,
                       "planned_compute_s": flops / (peak * assumed), "pass": efficiency >= 0.8 * assumed})
    else:
        result.update({"pass": None, "skipped": "no --gpu: nothing planned to compare with"})
    return result


def _collective_rank(rank: int, world: int, port: int, size_bytes: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    shard = torch.ones(size_bytes // 2 // world, dtype=torch.bfloat16, device="cuda")
    whole = torch.empty(shard.numel() * world, dtype=torch.bfloat16, device="cuda")
    results = {}
    for name, run in (("all_gather", lambda: dist.all_gather_into_tensor(whole, shard)),
                      ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, whole))):
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            run()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 10
        results[name] = whole.nbytes * (world - 1) / world / seconds  # bus bandwidth, as nccl-tests
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def check_collectives(device, gpu: str | None) -> dict:
    world = torch.cuda.device_count() if device.type == "cuda" else 0
    if world < 2:
        return {"pass": None, "skipped": f"{world} GPU(s): all-gather / reduce-scatter need two or more"}
    import socket

    import torch.multiprocessing as mp
    from argonne_dt.memory_plan import GPUS

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "bandwidth.json")
        mp.start_processes(_collective_rank, args=(world, port, 256 * 2**20, out), nprocs=world, start_method="spawn")
        with open(out) as f:
            bus = json.load(f)
    result = {"gpus": world, **{f"{name}_bus_GBps": value / 1e9 for name, value in bus.items()}}
    if gpu:
        assumed = GPUS[gpu].nvlink_bytes_per_s * GPUS[gpu].link_efficiency
        result.update({"assumed_bus_GBps": assumed / 1e9, "pass": min(bus.values()) >= 0.8 * assumed})
    else:
        result["pass"] = None
    return result


def planned_name(device) -> str | None:
    """The planner's name (``argonne_dt.memory_plan.GPUS``) of this GPU, or None for one it does not know."""
    name = torch.cuda.get_device_name(device).lower()
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    for family in ("h200", "h100", "a100"):
        if family in name:
            return f"{family}-40gb" if family == "a100" and memory_gib < 50 else \
                {"h200": "h200-141gb", "h100": "h100-80gb", "a100": "a100-80gb"}[family]
    return None


def _check_in_child(connection, fn, args) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        result = fn(*args)
    except Exception:  # noqa: BLE001 - a failed check is reported, and the others still run
        result = {"pass": False, "error": traceback.format_exc(limit=4)}
    connection.send(result)
    connection.close()


def run_check(name: str, budget_s: float, fn, *args) -> dict:
    """Run one check and print its JSON line at once. On a GPU: in a process of its own (spawned: CUDA
    does not survive a fork), killed when it outlasts ``budget_s`` seconds (its start-up included),
    also inside C code (a CUDA synchronization, an NCCL collective), so that the next check still runs.
    On CPU (the test of this script), where nothing waits on a device, in this process: a check over
    its budget is reported so, not stopped."""
    if not any(isinstance(arg, torch.device) and arg.type == "cuda" for arg in args):
        started = time.perf_counter()
        try:
            result = fn(*args)
        except Exception:  # noqa: BLE001 - a failed check is reported, and the others still run
            result = {"pass": False, "error": traceback.format_exc(limit=4)}
        return _report(name, result, started, budget_s)
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_check_in_child, args=(send, fn, args))
    started = time.perf_counter()
    child.start()
    send.close()
    if receive.poll(budget_s):
        try:
            result = receive.recv()
        except EOFError:
            child.join()
            result = {"pass": False, "error": f"its process ended (exit code {child.exitcode}) without a result"}
    else:
        result = {"pass": False, "error": f"over its budget of {budget_s:.0f} s: its process was killed"}
    if child.is_alive():
        child.kill()
    child.join()
    return _report(name, result, started, budget_s)


def _report(name: str, result: dict, started: float, budget_s: float) -> dict:
    seconds = time.perf_counter() - started
    if seconds > budget_s and result.get("pass") is not False:
        result = {**result, "pass": False, "error": f"over its budget of {budget_s:.0f} s"}
    line = {"check": name, **result, "seconds": round(seconds, 1), "budget_s": budget_s}
    print(json.dumps(line, default=str), flush=True)
    return line


def main() -> None:
    from argonne_dt.memory_plan import GPUS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=sorted(GPUS), help="the planner's name of this GPU (default: from its name)")
    parser.add_argument("--layers", type=int, default=4, help="4b9 blocks in the memory and step-time checks")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny.toml's shapes and short sequences (the CPU test)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every check's time budget")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = args.gpu
    if device.type == "cuda":
        gpu = gpu or planned_name(device)
    print(json.dumps({"check": "machine", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "planned_as": gpu, "torch": torch.__version__, "python": sys.version.split()[0]}), flush=True)
    base = "tiny.toml" if args.small else "4b9.toml"
    seq = 32 if args.small else args.seq
    # The functional checks: two 4b9 blocks (real head_dim and padding) at a vocabulary of 4,096, so
    # that DCP and compile take seconds; the memory and timing checks: the real vocabulary.
    reduced = load_config(base, ["--model.num_layers=2", "--parallel.tp=1", "--model.pad_head_dim=true",
                                 "--model.vocab_size=4096"])
    full = load_config(base, [f"--model.num_layers={1 if args.small else args.layers}", "--parallel.tp=1",
                              f"--data.seq_len={seq}"] + (["--model.vocab_size=4096"] if args.small else []))
    full = replace(full, model=replace(full.model, max_seq_len=max(seq, full.model.max_seq_len)))
    short = min(512, seq)
    scale = args.budget_scale
    results = [
        run_check("train_bf16", 45 * scale, check_train_bf16, reduced, device, 1, short),
        run_check("kv_cache_bf16", 20 * scale, check_kv_cache, reduced, device),
        run_check("dcp_roundtrip_sync", 20 * scale, check_dcp, reduced, device, 1, short, False),
        run_check("dcp_roundtrip_async", 20 * scale, check_dcp, reduced, device, 1, short, True),
        run_check("compile", 60 * scale, check_compile, reduced, device, 1, short),
    ]
    for ac in ("none", "selective", "full"):
        results.append(run_check(f"memory_{ac}", 30 * scale, check_memory, full, device, args.micro_batch, seq, ac))
    results.append(run_check("step_time", 30 * scale, check_step_time, full, device, args.micro_batch, seq, args.steps, gpu))
    results.append(run_check("collectives", 30 * scale, check_collectives, device, gpu))
    failed = [r["check"] for r in results if r.get("pass") is False]
    print(json.dumps({"check": "summary", "all_pass": not failed, "failed": failed,
                      "skipped": [r["check"] for r in results if r.get("pass") is None]}), flush=True)


if __name__ == "__main__":
    main()

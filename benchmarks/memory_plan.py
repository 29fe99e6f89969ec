"""Every layout of a run that fits the GPUs, fastest first, with memory, predicted tokens/s, MFU and
days for the token budget; or one layout in detail.

    python benchmarks/memory_plan.py --config 4b9.toml --gpus 8 --gpu a100-80gb
    python benchmarks/memory_plan.py --config 4b9.toml --gpus 64 --gpu h100-80gb --json plan.json
    python benchmarks/memory_plan.py --config 4b9.toml --gpus 8 --gpu a100-80gb --teacher qwen2.5-14b
    python benchmarks/memory_plan.py --config 4b9.toml --tp 8 --dp 1 --micro-batch 4 --ac full   # one layout

Memory is measured (see ``argonne_dt/memory_plan.py``): parameters from the parallelized model's shards,
activations from a block's step at the planned shape, the loss's transient from its own code path.
Communication is the closed form tested against a real step's collectives. Step time = FLOPs at
the GPU's stated matmul efficiency + tensor-parallel collectives (exposed) + what FSDP2's
collectives add beyond the compute they overlap (``memory_plan.fsdp_exposed_seconds``), over the stated
link bandwidths.
"""

import argparse

from common import emit_json

from argonne_dt.memory_plan import GPUS, QWEN25_TEACHERS, RESERVE, layouts, plan


def _assumptions(gpu: str) -> str:
    g = GPUS[gpu]
    return (f"assumptions for {gpu}: {g.peak_flops / 1e12:.0f} TFLOP/s bf16 peak at {g.matmul_efficiency:.0%} matmul "
            f"efficiency; NVLink {g.nvlink_bytes_per_s / 1e9:.0f} GB/s and InfiniBand {g.network_bytes_per_s / 1e9:.0f} "
            f"GB/s per GPU per direction at {g.link_efficiency:.0%} (NCCL ring bus bandwidth), {g.per_node} GPUs per "
            f"node, tp within a node; TP/SP collectives exposed; FSDP2's gathers overlapped with each micro-batch's compute "
            f"(but the first of each), its gradient reduce-scatter with the last micro-batch's backward (but the "
            f"root's); reserve: CUDA context "
            f"{RESERVE['cuda_context_gib']} GiB, cuBLAS workspaces {RESERVE['cublas_workspace_gib']} GiB, NCCL "
            f"{g.nccl_buffers_gib} GiB per communicator, 5% allocator slack")


def _memory(row: dict) -> str:
    parts = {**row["memory_gib"], **row["reserve_gib"]}
    return ", ".join(f"{name} {gib:.2f}" for name, gib in parts.items() if gib >= 0.005)


def _table(rows: list[dict]) -> None:
    print(f"{'tp':>3} {'dp':>3} {'ckpt':>9} {'mb':>3} {'accum':>5} {'tok/step':>8} {'GiB':>6} {'compute':>8} {'tp comm':>8} "
          f"{'dp exp.':>8} {'step s':>7} {'tokens/s':>9} {'MFU':>6} {'days':>6}")
    for r in rows:
        print(f"{r['tp']:>3} {r['dp']:>3} {r['activation_checkpoint']:>9} {r['micro_batch']:>3} {r['micro_batches']:>5} "
              f"{r['tokens_per_step']:>8,} "
              f"{r['total_gib']:>6.1f} {r['compute_s']:>8.3f} {r['tp_comm_s']:>8.3f} {r['exposed_dp_comm_s']:>8.3f} "
              f"{r['step_s']:>7.3f} {r['predicted_tokens_per_s']:>9,.0f} {r['mfu']:>6.1%} {r['predicted_days']:>6.1f}")


def _why(best: dict, rows: list[dict]) -> str:
    reasons = [f"the highest predicted throughput ({best['predicted_tokens_per_s']:,.0f} tokens/s, "
               f"{best['predicted_days']:.1f} days for {best['token_budget'] / 1e9:.1f}B tokens)"]
    if best["tp"] > 1:
        reasons.append(f"tensor parallelism costs {best['tp_comm_s'] / best['step_s']:.0%} of the step in exposed collectives")
    if best["dp"] > 1:
        reasons.append(f"FSDP2's collectives take {best['dp_comm_s']:.3f} s per step, of which compute leaves "
                       f"{best['exposed_dp_comm_s']:.3f} s exposed ({best['exposed_dp_comm_s'] / best['step_s']:.0%} of the step)")
    reasons.append(f"{best['total_gib']:.1f} of {best['gpu_gib']} GiB ({best['activation_checkpoint']} checkpointing)")
    safest = min(rows, key=lambda r: r["total_gib"])
    if safest is not best:
        reasons.append(f"the most memory headroom instead: tp {safest['tp']} x dp {safest['dp']}, "
                       f"{safest['activation_checkpoint']}, micro-batch {safest['micro_batch']} "
                       f"({safest['total_gib']:.1f} GiB, {safest['predicted_tokens_per_s']:,.0f} tokens/s)")
    return "; ".join(reasons)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="4b9.toml")
    parser.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS))
    parser.add_argument("--gpus", type=int, help="rank every layout of this many GPUs")
    parser.add_argument("--tp", type=int, default=8, help="one layout (without --gpus)")
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="default: the config's data.seq_len")
    parser.add_argument("--ac", nargs="+", default=["none", "selective", "full"], choices=["none", "selective", "full"])
    parser.add_argument("--teacher", choices=sorted(QWEN25_TEACHERS), help="plan distilling from this teacher (bf16)")
    parser.add_argument("--teacher-fsdp", action="store_true", help="the teacher's blocks sharded over dp too")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    teacher = f", distilling from {args.teacher} (bf16{', FSDP over dp' if args.teacher_fsdp else ''})" \
        if args.teacher else ""
    if args.gpus:
        rows = layouts(args.config, args.gpus, args.gpu, args.teacher, args.teacher_fsdp)
        print(f"{args.config} on {args.gpus} x {args.gpu}{teacher}: {len(rows)} layouts fit, fastest first")
        print(_assumptions(args.gpu))
        if not rows:
            print("nothing fits: more GPUs, or a GPU with more memory")
        else:
            _table(rows)
            best = rows[0]
            print(f"run: tp {best['tp']} x dp {best['dp']}, activation_checkpoint = \"{best['activation_checkpoint']}\", "
                  f"micro-batch {best['micro_batch']} x {best['micro_batches']} accumulated: {_why(best, rows)}")
            print(f"its memory per GPU (GiB): {_memory(best)}")
    else:
        rows = [plan(args.config, args.tp, args.dp, args.gpu, args.micro_batch, args.seq, ac, args.teacher,
                     args.teacher_fsdp) for ac in args.ac]
        first = rows[0]
        print(f"{first['config']} on {first['gpus']} x {first['gpu']} (tp {first['tp']}, dp {first['dp']}), "
              f"micro-batch {first['micro_batch']} x {first['seq_len']}{teacher}")
        print(_assumptions(args.gpu))
        if args.teacher and not first["teacher_runs"]:
            print(f"teacher {args.teacher}: does NOT run here: {first['teacher_reason']}")
        _table(rows)
        for r in rows:
            print(f"{r['activation_checkpoint']:>9}: {'fits' if r['fits'] else 'does NOT fit'}; {_memory(r)}")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()

"""Memory and throughput plan per GPU for a config, parallel layout, micro-batch and checkpoint mode.

    python benchmarks/plan.py --config 4b9.toml --tp 8 --gpu a100-80gb
    python benchmarks/plan.py --config 4b9.toml --tp 8 --dp 2 --micro-batch 2 --ac none --no-sp --json plan.json

Parameters, gradients and AdamW state are counted from the local shards of the really
parallelized model (see ``argonne_dt/plan.py``); activations are estimated per layer.
"""

import argparse

from common import emit_json

from argonne_dt.plan import GPUS, QWEN25_TEACHERS, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="4b9.toml")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="default: the config's data.seq_len")
    parser.add_argument("--ac", nargs="+", default=["none", "selective", "full"], choices=["none", "selective", "full"])
    parser.add_argument("--no-sp", action="store_true", help="without sequence parallelism")
    parser.add_argument("--mfu", type=float, default=0.5)
    parser.add_argument("--teacher", choices=sorted(QWEN25_TEACHERS), help="plan distilling from this teacher (bf16)")
    parser.add_argument("--teacher-fsdp", action="store_true", help="the teacher's blocks sharded over dp too")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [plan(args.config, args.tp, args.dp, args.gpu, args.micro_batch, args.seq, ac, not args.no_sp, args.mfu,
                 args.teacher, args.teacher_fsdp) for ac in args.ac]
    first = rows[0]
    print(f"{first['config']} on {first['tp'] * first['dp']} x {first['gpu']} (tp {first['tp']}, dp {first['dp']}), "
          f"micro-batch {first['micro_batch']} x {first['seq_len']}, sequence parallel {first['sequence_parallel']}")
    print(f"local parameters {first['local_parameters']:,} (meta-device shards = closed form): "
          f"params {first['parameters_fp32_gib']:.2f} + grads {first['gradients_fp32_gib']:.2f} "
          f"+ AdamW {first['adamw_state_fp32_gib']:.2f} GiB")
    if args.teacher and not first["teacher_runs"]:
        print(f"teacher {args.teacher}: does NOT run here: {first['teacher_reason']}")
    elif args.teacher:
        print(f"teacher {args.teacher} (bf16{', FSDP over dp' if args.teacher_fsdp else ''}): "
              f"{first['teacher_local_parameters']:,} local parameters = {first['teacher_weights_bf16_gib']:.2f} GiB, "
              f"forward working set and kept states {first['teacher_activations_gib']:.2f} GiB, "
              f"KL chunks {first['kl_chunks_gib']:.2f} GiB (included in the totals below)")
    print(f"{'checkpointing':>13} {'acts/layer':>10} {'acts':>8} {'logits':>8} {'total':>8} {'GPU':>6}  verdict")
    for r in rows:
        verdict = "fits" if r["fits"] else "cannot run at this tp" if r.get("teacher_runs") is False else "does NOT fit"
        print(f"{r['activation_checkpoint']:>13} {r['activations_per_layer_gib']:>9.2f}G {r['activations_gib']:>7.2f}G "
              f"{r['logits_and_loss_gib']:>7.2f}G {r['total_gib']:>7.2f}G {r['gpu_gib']:>5}G  {verdict}")
    print(f"at {first['mfu']:.0%} MFU: {first['predicted_tokens_per_s']:,.0f} tokens/s, "
          f"{first['predicted_days_for_21.9B_tokens']:.1f} days for 21.9B tokens")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()

"""The distillation step against plain pretraining of the same student, alternating in one process.

    python benchmarks/distill_step.py --config distill-tiny.toml [--teacher-width 2] [--steps 3] [--json out.json]

Both run the trainer's own step (``argonne_dt.step.train_step``, the config's gradient accumulation on
one process) on the same random batches from the same initial student; the distillation step adds the teacher's forward and the chunked KL
(``distill.alpha``, ``distill.temperature``, ``distill.teacher_dtype`` from the config). The
teacher is the student's architecture made ``--teacher-width`` times wider (heads and MLP; same
head size and depth) with Qwen2's q/k/v biases and an untied lm_head, randomly initialized.
Peak memory is the resident-set peak of a step above the level just before it.
"""

import argparse
import copy
import statistics
import time
from dataclasses import replace

import torch
from common import PeakRss, emit_json, random_micro_batches

from argonne_dt.config import load_config
from argonne_dt.distill import DistillationObjective
from argonne_dt.distributed import compute_dtype, dtype_named, grad_accum_steps, mixed_precision
from argonne_dt.optim import build_optimizer
from argonne_dt.parallelize import build_model
from argonne_dt.step import train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="distill-tiny.toml")
    parser.add_argument("--teacher-width", type=int, default=2, help="teacher heads and MLP width / the student's")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, overrides)
    device = torch.device("cpu")
    m, w = cfg.model, args.teacher_width
    teacher_cfg = replace(m, hidden_size=m.hidden_size * w, num_heads=m.num_heads * w, num_kv_heads=m.num_kv_heads * w,
                          intermediate_size=m.ffn_dim * w, attention_bias=True, tie_embeddings=False)
    teacher_dtype = dtype_named(cfg.distill.teacher_dtype, device)
    teacher = build_model(teacher_cfg, seed=7, weights_dtype=teacher_dtype).requires_grad_(False).eval()
    students = {"pretraining": build_model(m, seed=cfg.train.seed)}
    students["distillation"] = copy.deepcopy(students["pretraining"])
    optimizers = {name: build_optimizer(model, cfg.optim, device.type) for name, model in students.items()}
    objectives = {"pretraining": None, "distillation": DistillationObjective(teacher, cfg.distill, device)}
    autocast = mixed_precision(compute_dtype(cfg, device), device)
    accumulation = grad_accum_steps(cfg.train, dp=1)
    micro_batches = random_micro_batches(m.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len,
                                         (args.warmup + args.steps) * accumulation)
    steps = [micro_batches[i : i + accumulation] for i in range(0, len(micro_batches), accumulation)]
    results = {name: {"times": [], "memory": []} for name in students}
    for index, step in enumerate(steps):
        for name, model in students.items():
            extra = {"objective": objectives[name]} if objectives[name] else {}
            with PeakRss() as rss:
                start = time.perf_counter()
                train_step(model, optimizers[name], step, device, autocast, cfg.optim.grad_clip, None, **extra)
                elapsed = time.perf_counter() - start
            if index >= args.warmup:
                results[name]["times"].append(elapsed)
                results[name]["memory"].append(rss.delta)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len * accumulation
    summary = {name: {"tokens_per_s": tokens / statistics.median(r["times"]), "step_s_median": statistics.median(r["times"]),
                      "peak_step_memory_mib": max(r["memory"]) / 2**20} for name, r in results.items()}
    summary["speed_ratio"] = summary["distillation"]["tokens_per_s"] / summary["pretraining"]["tokens_per_s"]
    summary["memory_ratio"] = summary["distillation"]["peak_step_memory_mib"] / summary["pretraining"]["peak_step_memory_mib"]
    summary["settings"] = {"config": args.config, "batch": [cfg.train.micro_batch_size, cfg.data.seq_len],
                           "micro_batches_per_step": accumulation,
                           "student_parameters": students["pretraining"].num_parameters(),
                           "teacher_parameters": teacher.num_parameters(), "teacher_dtype": str(teacher_dtype),
                           "compute_dtype": str(compute_dtype(cfg, device)), "alpha": cfg.distill.alpha,
                           "temperature": cfg.distill.temperature, "threads": torch.get_num_threads()}
    print(f"{'':13} {'tokens/s':>9} {'step s':>8} {'peak MiB':>9}")
    for name in students:
        s = summary[name]
        print(f"{name:13} {s['tokens_per_s']:>9,.0f} {s['step_s_median']:>8.3f} {s['peak_step_memory_mib']:>9,.0f}")
    print(f"distillation: {summary['speed_ratio']:.2f}x the tokens/s of pretraining, {summary['memory_ratio']:.2f}x its "
          f"step memory (teacher {summary['settings']['teacher_parameters'] / 1e6:.0f}M parameters, "
          f"student {summary['settings']['student_parameters'] / 1e6:.0f}M)")
    emit_json(summary, args.json)


if __name__ == "__main__":
    main()

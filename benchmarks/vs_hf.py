"""Train our model and Hugging Face LlamaForCausalLM of the same shape, dtype and data, alternating.

    python benchmarks/vs_hf.py --config tiny.toml [--steps 6] [--json out.json] [--profile]
    python benchmarks/vs_hf.py --no-fused-loss --no-fused-adamw     # ablations: what each change gains

One process, one run: both models start from the same weights, see the same batches, use bf16
autocast over fp32 master weights and AdamW with the same hyper-parameters (ours fused, theirs
torch's default foreach, as in a plain Hugging Face training loop); both go through the
trainer's own step (``argonne_dt.step.train_step``: accumulation, global clip, optimizer), theirs
with Hugging Face's own loss (``labels=``). A round is one step of each. Peak memory is the resident-set peak during a step above the level just before it (freed
heap is returned to the OS first with malloc_trim, so the order of the two does not matter).
"""

import argparse
import statistics
import time

import torch

from common import PeakRss, emit_json, random_micro_batches

from argonne_dt.config import load_config
from argonne_dt.hf import llama_config, to_hf_state_dict
from argonne_dt.optim import build_optimizer
from argonne_dt.parallelize import build_model, compile_blocks
from argonne_dt.step import train_step

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny.toml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-fused-loss", action="store_true", help="ours: full logits, then cross-entropy")
    parser.add_argument("--no-fused-adamw", action="store_true", help="ours: foreach AdamW like theirs")
    parser.add_argument("--fp32", action="store_true", help="both without bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile attention and MLP per block")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step of each")
    parser.add_argument("--json", help="also write the results here")
    args, overrides = parser.parse_known_args()
    from transformers import LlamaForCausalLM

    cfg = load_config(args.config, overrides)
    cfg.optim.fused = not args.no_fused_adamw
    ours = build_model(cfg.model, seed=cfg.train.seed)
    if args.no_fused_loss:
        ours.use_loss_path(fused_chunk=0)
    if args.compile:
        compile_blocks(ours)
    hf_config = llama_config(cfg.model)
    hf_config._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_config)
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    theirs.tie_weights()
    ours_opt = build_optimizer(ours, cfg.optim, "cpu")
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                   eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32)
    device = torch.device("cpu")

    def their_loss(model, batch, device):
        return {"loss": model(input_ids=batch["input"], labels=batch["input"]).loss}

    def our_step(batch):
        return train_step(ours, ours_opt, [batch], device, autocast, cfg.optim.grad_clip, None)

    def their_step(batch):
        return train_step(theirs, theirs_opt, [batch], device, autocast, cfg.optim.grad_clip, None, their_loss)

    results = {"ours": {"times": [], "mem": []}, "hf": {"times": [], "mem": []}}
    batches = random_micro_batches(cfg.model.vocab_size, cfg.train.micro_batch_size, cfg.data.seq_len,
                                   args.warmup + args.steps + 1)
    for round_index, batch in enumerate(batches[:-1]):
        for name, step in (("ours", our_step), ("hf", their_step)):
            with PeakRss() as rss:
                start = time.perf_counter()
                step(batch)
                elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                results[name]["times"].append(elapsed)
                results[name]["mem"].append(rss.delta)
    if args.profile:
        from torch.profiler import profile

        for name, step in (("ours", our_step), ("hf", their_step)):
            with profile() as prof:
                step(batches[-1])
            print(f"--- {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    summary = {}
    for name, r in results.items():
        median = statistics.median(r["times"])
        summary[name] = {"tokens_per_s": tokens / median, "step_s_median": median,
                         "peak_step_memory_mib": max(r["mem"]) / 2**20}
    summary["speedup"] = summary["ours"]["tokens_per_s"] / summary["hf"]["tokens_per_s"]
    summary["memory_ratio"] = summary["ours"]["peak_step_memory_mib"] / summary["hf"]["peak_step_memory_mib"]
    summary["settings"] = {"config": args.config, "batch": [cfg.train.micro_batch_size, cfg.data.seq_len], "fused_loss": not args.no_fused_loss,
                           "fused_adamw": not args.no_fused_adamw, "bf16": not args.fp32, "compile": args.compile,
                           "threads": torch.get_num_threads()}
    print(f"{'':6} {'tokens/s':>10} {'step s':>8} {'peak MiB':>9}")
    for name in ("ours", "hf"):
        s = summary[name]
        print(f"{name:6} {s['tokens_per_s']:>10,.0f} {s['step_s_median']:>8.3f} {s['peak_step_memory_mib']:>9,.0f}")
    print(f"speed-up {summary['speedup']:.2f}x, memory {summary['memory_ratio']:.2f}x of Hugging Face's")
    emit_json(summary, args.json)


if __name__ == "__main__":
    main()

"""Tokens/s of the full data pipeline (read, filter, tokenize, pack, batch) on the sample corpus.

    python benchmarks/data_throughput.py [--workers 1 2 4] [--tokens 2000000] [--json out.json]

Compared with what 4b9 on 8 x A100 80GB consumes in the planner's predicted layout (``argonne_dt.memory_plan``:
FSDP2 over 8 GPUs, no checkpointing, micro-batch 2): about 43K tokens/s.
"""

import argparse
import time

from common import emit_json

from argonne_dt.config import DataConfig
from argonne_dt.data import batches_for
from argonne_dt.memory_plan import plan


def consumption_rate_4b9() -> float:
    """The planner's predicted tokens/s of 4b9 on 8 x A100 80GB in the layout it picks there."""
    return plan("4b9.toml", tp=1, dp=8, gpu="a100-80gb", micro_batch=2, seq=None, ac="none")["predicted_tokens_per_s"]


def measure(workers: int, tokens: int, seq_len: int, batch: int) -> dict:
    cfg = DataConfig(seq_len=seq_len, num_workers=workers, prefetch=4)
    it = iter(batches_for(cfg, batch))
    next(it)  # tokenizer load, thread start-up and the corpus build stay out of the timing
    start, seen = time.perf_counter(), 0
    while seen < tokens:
        seen += next(it)["input"].numel()
    elapsed = time.perf_counter() - start
    return {"workers": workers, "tokens": seen, "seconds": elapsed, "tokens_per_s": seen / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    need = consumption_rate_4b9()
    rows = [measure(w, args.tokens, args.seq_len, args.batch) for w in args.workers]
    print(f"4b9 on 8 x A100 80GB consumes {need:,.0f} tokens/s (the planner's prediction, tp 1 x dp 8)")
    print(f"{'workers':>8} {'tokens/s':>12} {'x needed':>9}")
    for row in rows:
        row["ratio_to_4b9_need"] = row["tokens_per_s"] / need
        print(f"{row['workers']:>8} {row['tokens_per_s']:>12,.0f} {row['ratio_to_4b9_need']:>9.1f}")
    emit_json({"needed_tokens_per_s": need, "results": rows}, args.json)


if __name__ == "__main__":
    main()

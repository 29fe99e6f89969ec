"""Draw "training loss vs tokens" from a run's metrics.jsonl as a PNG.

    python launch/plot_loss.py runs/tiny [--out runs/tiny/training_loss_vs_tokens.png]
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/training_loss_vs_tokens.png)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    source = run / "metrics.jsonl"
    if not source.exists():
        raise SystemExit(f"{source} not found: is {run} a run directory (job.dir)?")
    points = {}
    for line in source.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "tokens_seen" in record:
            points[record["tokens_seen"]] = record["loss"]  # a resumed run rewrites later points
    if not points:
        raise SystemExit(f"{source} has no loss records yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = sorted(points)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(tokens, [points[t] for t in tokens], linewidth=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss vs tokens ({run.name})")
    ax.grid(alpha=0.3)
    out = Path(args.out) if args.out else run / "training_loss_vs_tokens.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()

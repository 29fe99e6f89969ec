"""The loss curves of a run as one PNG, from its ``metrics.jsonl`` (needs matplotlib: ``pip install .[plot]``)."""

from __future__ import annotations

import json
from pathlib import Path

# Weight of the newest point in the smoothed training curve (an exponential moving average).
SMOOTHING = 0.3


def read_curves(metrics_path: Path) -> tuple[dict[int, tuple[int, float]], dict[int, tuple[int, float]]]:
    """step -> (tokens seen, loss) of the training log lines and of the validations; a step logged
    twice (before and after a resume) keeps its last record."""
    training, validation, tokens_at = {}, {}, {}
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line a crash cut short
        step = record.get("step")
        if "tokens_seen" in record:
            tokens_at[step] = record["tokens_seen"]
        if "loss" in record and "tokens_seen" in record:
            training[step] = (record["tokens_seen"], record["loss"])
        if "eval_loss" in record:
            validation[step] = (record.get("tokens_seen", tokens_at.get(step)), record["eval_loss"])
    return training, {s: v for s, v in validation.items() if v[0] is not None}


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, average = [], None
    for value in values:
        average = value if average is None else weight * value + (1 - weight) * average
        out.append(average)
    return out


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training loss (each log line's window mean, and lightly smoothed) and validation loss against
    tokens, in one PNG; returns where it went (default ``RUN_DIR/loss_vs_tokens.png``)."""
    run = Path(run_dir)
    source = run / "metrics.jsonl"
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: is {run} a run directory (job.dir)?")
    training, validation = read_curves(source)
    if not training:
        raise ValueError(f"{source} has no training loss records yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    tokens, losses = zip(*(training[s] for s in sorted(training)))
    ax.plot(tokens, losses, linewidth=0.8, alpha=0.35, color="tab:blue", label="training (mean per log line)")
    ax.plot(tokens, smoothed(list(losses)), linewidth=1.6, color="tab:blue", label="training (smoothed)")
    if validation:
        eval_tokens, eval_losses = zip(*(validation[s] for s in sorted(validation)))
        ax.plot(eval_tokens, eval_losses, "o-", linewidth=1.6, color="tab:orange", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"Loss vs tokens ({run.name})")
    ax.grid(alpha=0.3)
    ax.legend()
    target = Path(out) if out else run / "loss_vs_tokens.png"
    fig.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return target

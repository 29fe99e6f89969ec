"""Draw a run's training and validation loss against tokens as one PNG, from its metrics.jsonl.

    python launch/plot_loss.py runs/tiny [--out runs/tiny/loss_vs_tokens.png]
"""

import argparse

from argonne_dt.plot import plot_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/loss_vs_tokens.png)")
    args = parser.parse_args()
    try:
        out = plot_losses(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Validation loss and perplexity of a checkpoint on held-out parquet data.

    python launch/evaluate.py --checkpoint runs/tiny --data 'heldout/*.parquet' [--batches 50]
"""

import argparse
import json

from argonne_dt.evaluation import evaluate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", action="append", required=True, help="parquet file, directory or glob; repeatable")
    parser.add_argument("--batches", type=int, default=0, help="0: the whole held-out set")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, args.batches, args.micro_batch_size)))


if __name__ == "__main__":
    main()

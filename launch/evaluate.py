"""Validation loss and perplexity of a checkpoint on held-out parquet data, or its multiple-choice accuracy.

    python launch/evaluate.py --checkpoint runs/tiny --data 'heldout/*.parquet' [--batches 50]
    python launch/evaluate.py --checkpoint runs/mine [--batches 50]      # the run's own held-out data
    python launch/evaluate.py --checkpoint runs/tiny --multiple-choice hellaswag_val.jsonl [--limit 1000]
"""

import argparse
import json
import sys

from argonne_dt.downstream import evaluate_multiple_choice
from argonne_dt.errors import add_debug_option, run_reporting_user_errors
from argonne_dt.evaluation import evaluate_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", action="append", help="parquet file, directory or glob; repeatable. Default: the "
                        "run's held-out data (data.eval_paths, data.eval_split of data.paths, or the sample corpus's)")
    parser.add_argument("--batches", type=int, default=0, help="0: the whole held-out set")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--multiple-choice", metavar="JSONL",
                        help="a multiple-choice task (HellaSwag's ctx / endings / label, or context / choices / answer)")
    parser.add_argument("--limit", type=int, default=0, help="with --multiple-choice: the first N questions (0: all)")
    add_debug_option(parser)
    args = parser.parse_args()

    def evaluate() -> None:
        if args.multiple_choice:
            result = evaluate_multiple_choice(args.checkpoint, args.multiple_choice, args.limit)
        else:
            result = evaluate_checkpoint(args.checkpoint, args.data, args.batches, args.micro_batch_size)
        print(json.dumps(result))

    return run_reporting_user_errors(evaluate, args.debug)


if __name__ == "__main__":
    sys.exit(main())

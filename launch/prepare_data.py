"""Convert your own text into FineWeb-schema parquet shards for data.paths.

    python launch/prepare_data.py --out data/mine  notes/*.txt corpus.jsonl other.parquet
    python launch/prepare_data.py --sample          # build (or find) the bundled sample corpus

Text files become one document each; JSONL rows and parquet rows one document per row (the
--text-key field / column).
"""

import argparse
import sys

from argonne_dt.corpus import convert_to_shards, sample_corpus
from argonne_dt.errors import add_debug_option, run_reporting_user_errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="text, .jsonl or .parquet files")
    parser.add_argument("--out", help="output directory for shard-NNNNN.parquet")
    parser.add_argument("--text-key", default="text", help="JSON field / parquet column with the text")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--rows-per-row-group", type=int, default=1_000)
    parser.add_argument("--sample", action="store_true", help="build the bundled sample corpus and print its path")
    add_debug_option(parser)
    args = parser.parse_args()
    if not args.sample and (not args.inputs or not args.out):
        parser.error("give input files and --out (or --sample)")

    def prepare() -> None:
        if args.sample:
            print(sample_corpus())
            return
        paths = convert_to_shards(args.inputs, args.out, args.text_key, args.rows_per_shard, args.rows_per_row_group)
        print(f"wrote {len(paths)} shard(s) to {args.out}")

    return run_reporting_user_errors(prepare, args.debug)


if __name__ == "__main__":
    sys.exit(main())

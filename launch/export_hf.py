"""Export a checkpoint as a Hugging Face Llama directory (config, safetensors, tokenizer).

    python launch/export_hf.py --checkpoint runs/tiny --out hf/tiny [--dtype bf16|fp32]
"""

import argparse
import sys

from argonne_dt.errors import add_debug_option, run_reporting_user_errors
from argonne_dt.hf import export_hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or step directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    add_debug_option(parser)
    args = parser.parse_args()
    return run_reporting_user_errors(
        lambda: print(export_hf(args.checkpoint, args.out, args.dtype, int(args.max_shard_gb * 2**30))), args.debug)


if __name__ == "__main__":
    sys.exit(main())

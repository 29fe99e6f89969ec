"""Import a Llama-format Hugging Face directory (safetensors) as a checkpoint training can start from.

    python launch/import_hf.py --hf hf/tiny --out imported/tiny
    torchrun ... launch/train_dt.py --config tiny.toml --checkpoint.initial_load_path=imported/tiny
"""

import argparse
import sys

from argonne_dt.errors import add_debug_option, run_reporting_user_errors
from argonne_dt.hf import import_hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--tokenizer", default="qwen2.5")
    add_debug_option(parser)
    args = parser.parse_args()
    return run_reporting_user_errors(lambda: print(import_hf(args.hf, args.out, args.tokenizer)), args.debug)


if __name__ == "__main__":
    sys.exit(main())

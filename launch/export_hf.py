"""Export a checkpoint as a Hugging Face Llama directory (config, safetensors, tokenizer).

    python launch/export_hf.py --checkpoint runs/tiny --out hf/tiny [--dtype bf16|fp32]
"""

import argparse

from argonne_dt.hf import export_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or step directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args()
    print(export_hf(args.checkpoint, args.out, args.dtype, int(args.max_shard_gb * 2**30)))


if __name__ == "__main__":
    main()

"""Import a Llama-format Hugging Face directory (safetensors) as a checkpoint training can start from.

    python launch/import_hf.py --hf hf/tiny --out imported/tiny
    torchrun ... launch/train_dt.py --config tiny.toml --checkpoint.initial_load_path=imported/tiny
"""

import argparse

from argonne_dt.hf import import_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--tokenizer", default="qwen2.5")
    args = parser.parse_args()
    print(import_hf(args.hf, args.out, args.tokenizer))


if __name__ == "__main__":
    main()

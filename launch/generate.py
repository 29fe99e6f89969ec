"""Generate text from a checkpoint (saved under any TP degree).

    python launch/generate.py --checkpoint runs/tiny --prompt "Long long time ago, "
    python launch/generate.py --checkpoint runs/tiny --prompt "A" --prompt "B" --temperature 0.8 --top-p 0.9
    torchrun --nproc-per-node 2 launch/generate.py --checkpoint runs/4b9 --prompt "..."   # tensor parallel
"""

import argparse
import os
import sys

from argonne_dt.errors import add_debug_option, run_reporting_user_errors
from argonne_dt.generate import SamplingConfig, generate_from_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or step directory")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_debug_option(parser)
    args = parser.parse_args()

    def main_rank() -> bool:  # torchrun's RANK: the process group starts later, when the model loads
        return os.environ.get("RANK", "0") == "0"

    def stream(piece: str) -> None:
        if main_rank():
            sys.stdout.write(piece)
            sys.stdout.flush()

    def generate() -> None:
        sampling = SamplingConfig(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k,
                                  args.top_p, args.repetition_penalty, args.seed)
        single = len(args.prompt) == 1
        unsaid = [args.prompt[0]] if single else []  # the prompt, once the model has loaded

        def stream_after_prompt(piece: str) -> None:
            while unsaid:
                stream(unsaid.pop())
            stream(piece)

        texts = generate_from_checkpoint(args.checkpoint, args.prompt, sampling, stream_after_prompt if single else None)
        if single:
            stream_after_prompt("\n")
        elif main_rank():
            for prompt, text in zip(args.prompt, texts):
                print(f"--- {prompt!r}\n{prompt}{text}")

    return run_reporting_user_errors(generate, args.debug)


if __name__ == "__main__":
    sys.exit(main())

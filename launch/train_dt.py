"""Train (or resume) an Argonne model.

    torchrun --nproc-per-node 8 launch/train_dt.py --config 4b9.toml [--section.key=value ...]
    torchrun --nproc-per-node 2 launch/train_dt.py --config tiny.toml          # CPU, gloo, TP 2

A restarted job resumes from the newest complete checkpoint in job.dir by itself.
"""

import argparse
import sys

from argonne_dt.config import load_config
from argonne_dt.errors import add_debug_option, run_reporting_user_errors
from argonne_dt.trainer import train


def main(run=train, description: str = __doc__) -> int:
    """Parse ``--config`` and overrides, then ``run(cfg)``; a config or data error exits 2 with its message
    (printed once; ``--debug``: the traceback)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny.toml", help="bundled config name or path to a TOML file")
    add_debug_option(parser)
    args, overrides = parser.parse_known_args()
    return run_reporting_user_errors(lambda: run(load_config(args.config, overrides)), args.debug)


if __name__ == "__main__":
    sys.exit(main())

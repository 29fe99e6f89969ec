"""Train (or resume) an Argonne model.

    torchrun --nproc-per-node 8 launch/train_dt.py --config 4b9.toml [--section.key=value ...]
    torchrun --nproc-per-node 2 launch/train_dt.py --config tiny.toml          # CPU, gloo, TP 2

A restarted job resumes from the newest complete checkpoint in job.dir by itself.
"""

import argparse
import logging
import sys

from argonne_dt.config import ConfigError, load_config
from argonne_dt.trainer import train


def main(run=train, description: str = __doc__) -> int:
    """Parse ``--config`` and overrides, then ``run(cfg)``; a config error exits 2 with its message."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny.toml", help="bundled config name or path to a TOML file")
    args, overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(load_config(args.config, overrides))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

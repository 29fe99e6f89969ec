"""Memory and throughput plan per GPU for a config, parallel layout, micro-batch and checkpoint mode.

The command line is ``benchmarks/plan.py``.

Parameters, gradients and AdamW state are counted from the local shards of the really
parallelized model, built on the meta device under a fake process group of the planned world
size (and checked against the closed form). Activations are estimated per layer from the
tensors autograd keeps (bf16 compute, fp32 residual stream), for each checkpoint mode.
"""

from __future__ import annotations

import math

import torch.distributed as dist

from .config import load_config
from .distributed import build_layout
from .metrics import PEAK_BF16_FLOPS
from .parallelize import build_model

GPUS = {  # memory in GiB, bf16 peak FLOP/s
    "a100-40gb": (40, PEAK_BF16_FLOPS["a100"]),
    "a100-80gb": (80, PEAK_BF16_FLOPS["a100"]),
    "h100-80gb": (80, PEAK_BF16_FLOPS["h100"]),
    "h200-141gb": (141, PEAK_BF16_FLOPS["h200"]),
}
RESERVED_GIB = 2.0  # CUDA context, NCCL buffers, allocator slack
GIB = 2**30


def local_parameter_count(cfg, tp: int, dp: int) -> int:
    """Rank 0's parameter elements after TP (and FSDP over dp) on the meta device, fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * dp)
    try:
        cfg.parallel.tp, cfg.parallel.dp = tp, dp
        model = build_model(cfg.model, build_layout(cfg.parallel, "cpu"), device="meta")
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()


def closed_form_parameters(m, tp: int, dp: int) -> int:
    """The same count by arithmetic: torch.chunk sizes for the vocab, whole heads per rank."""
    vocab_rows = math.ceil(m.vocab_size / tp)
    per_layer = (m.hidden_size * m.num_heads * m.head_dim * 2 // tp          # q and o
                 + m.hidden_size * m.num_kv_heads * m.head_dim * 2 // tp      # k and v
                 + 3 * m.hidden_size * m.ffn_dim // tp + 2 * m.hidden_size)   # SwiGLU, norms
    total = vocab_rows * m.hidden_size + m.num_layers * per_layer + m.hidden_size
    if dp == 1:
        return total
    # FSDP2 shards every tensor on dim 0 over dp (torch.chunk): rank 0 gets the ceiling.
    def fsdp(rows, cols=1):
        return math.ceil(rows / dp) * cols

    layer = (fsdp(m.num_heads * m.head_dim // tp, m.hidden_size) + fsdp(m.hidden_size, m.num_heads * m.head_dim // tp)
             + 2 * fsdp(m.num_kv_heads * m.head_dim // tp, m.hidden_size)
             + 2 * fsdp(m.ffn_dim // tp, m.hidden_size) + fsdp(m.hidden_size, m.ffn_dim // tp) + 2 * fsdp(m.hidden_size))
    return fsdp(vocab_rows, m.hidden_size) + m.num_layers * layer + fsdp(m.hidden_size)


def activation_bytes(m, batch: int, seq: int, tp: int, sp: bool, ac: str) -> dict:
    """Bytes kept for backward per GPU: per layer, for all layers, and for the logits / loss."""
    bt, d, f = batch * seq, m.hidden_size, m.ffn_dim
    kv = m.num_kv_heads * m.head_dim
    seq_shard = tp if sp else 1
    norm_inputs = 2 * 4 * bt * d / seq_shard                     # fp32 residual stream into both norms
    gathered_inputs = 2 * 2 * bt * d                              # bf16 inputs of qkv and gate/up (full sequence)
    attention = (2 * 2 * bt * (d + 2 * kv)                        # q, k, v before and after rotary
                 + 2 * bt * d + 4 * bt * m.num_heads) / tp       # attention output, logsumexp
    mlp = 4 * 2 * bt * f / tp                                     # gate, up, silu(gate), product
    layer_full = norm_inputs + gathered_inputs + attention + mlp
    block_input = 4 * bt * d / seq_shard
    if ac == "none":
        layers = m.num_layers * layer_full
    elif ac == "full":  # each block keeps its input; one block is recomputed at a time
        layers = m.num_layers * block_input + layer_full
    else:  # selective (op level): matmul and attention outputs are kept, the rest recomputed
        kept = (2 * bt * (d + 2 * kv) + 2 * bt * d + 4 * bt * m.num_heads + 2 * 2 * bt * f) / tp + 2 * 2 * bt * d / seq_shard
        layers = m.num_layers * (block_input + kept) + layer_full
    # Logits (vocab-sharded under TP): bf16 output, fp32 copy, fp32 gradient.
    logits = bt * math.ceil(m.vocab_size / tp) * (2 + 4 + 4) if tp > 1 else 1024 * m.vocab_size * 4 * 2
    return {"per_layer": layer_full, "layers": layers, "logits": logits, "total": layers + logits}


def plan(config: str, tp: int, dp: int, gpu: str, micro_batch: int, seq: int | None, ac: str, sp: bool, mfu: float) -> dict:
    cfg = load_config(config)
    seq = seq or cfg.data.seq_len
    cfg.parallel.sequence_parallel = sp
    params = local_parameter_count(cfg, tp, dp)
    expected = closed_form_parameters(cfg.model, tp, dp)
    if params != expected:
        raise AssertionError(f"meta-device shards hold {params:,} parameters, the closed form says {expected:,}")
    memory_gib, peak = GPUS[gpu]
    acts = activation_bytes(cfg.model, micro_batch, seq, tp, sp and tp > 1, ac)
    states = {"parameters_fp32": 4 * params, "gradients_fp32": 4 * params, "adamw_state_fp32": 8 * params}
    total = sum(states.values()) + acts["total"] + RESERVED_GIB * GIB
    flops_per_token = build_model(cfg.model, device="meta").flops_per_token(seq)
    tokens_per_s = tp * dp * peak * mfu / flops_per_token
    return {
        "config": config, "gpu": gpu, "tp": tp, "dp": dp, "micro_batch": micro_batch, "seq_len": seq,
        "activation_checkpoint": ac, "sequence_parallel": sp, "local_parameters": params,
        **{f"{k}_gib": v / GIB for k, v in states.items()},
        "activations_per_layer_gib": acts["per_layer"] / GIB, "activations_gib": acts["layers"] / GIB,
        "logits_and_loss_gib": acts["logits"] / GIB, "reserved_gib": RESERVED_GIB,
        "total_gib": total / GIB, "gpu_gib": memory_gib, "fits": total / GIB <= memory_gib,
        "mfu": mfu, "predicted_tokens_per_s": tokens_per_s,
        "predicted_days_for_21.9B_tokens": 21.9e9 / tokens_per_s / 86400,
    }

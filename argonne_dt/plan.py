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

from dataclasses import replace

from .config import ConfigError, ModelConfig, ParallelConfig, check_tp_divides, load_config
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
# The published architectures of Qwen2.5 teachers (their config.json): planning needs no weights.
QWEN25_TEACHERS = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_layers=48, num_heads=40, num_kv_heads=8),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40, num_kv_heads=8),
}


def local_parameter_count(model: ModelConfig, parallel: ParallelConfig, tp: int, dp: int,
                          shard_root: bool = True) -> int:
    """Rank 0's parameter elements after TP (and FSDP over dp) on the meta device, fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * dp)
    try:
        layout = build_layout(replace(parallel, tp=tp, dp=dp), "cpu")
        built = build_model(model, layout, device="meta", shard_root=shard_root)
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in built.parameters())
    finally:
        dist.destroy_process_group()


def teacher_model(name: str, student: ModelConfig) -> ModelConfig:
    """A Qwen2.5 teacher as the distillation builds it: biases, untied, its vocabulary cut to the student's."""
    shape = QWEN25_TEACHERS[name]
    return ModelConfig(vocab_size=student.vocab_size, head_dim=shape["hidden_size"] // shape["num_heads"],
                       max_seq_len=student.max_seq_len, rope_theta=1e6, attention_bias=True, tie_embeddings=False,
                       **shape)


def teacher_bytes(name: str, student: ModelConfig, parallel: ParallelConfig, tp: int, dp: int, batch: int, seq: int,
                  shard_over_dp: bool, chunk: int = 1024) -> dict:
    """Per-GPU bytes a bf16 teacher adds to a step: its weights (counted from its meta-device shards),
    one block's forward working set (no gradients), its final hidden states kept for the loss, and
    the loss's chunk of both models' fp32 logits with the student's replicated hidden states."""
    model = teacher_model(name, student)
    try:
        check_tp_divides(model, tp)
    except ConfigError as err:
        return {"runs": False, "reason": str(err)}
    params = local_parameter_count(model, parallel, tp, dp if shard_over_dp else 1, shard_root=False)
    bt, d, f = batch * seq, model.hidden_size, model.ffn_dim
    kv = model.num_kv_heads * model.head_dim
    seq_shard = tp if parallel.sequence_parallel and tp > 1 else 1
    block = bt * (4 * d / seq_shard + 2 * d + 2 * (2 * d + 2 * kv) / tp + 6 * f / tp)
    kept = 2 * bt * d + 2 * 4 * bt * student.hidden_size  # teacher states (bf16); student's and their gradient
    kl = 8 * chunk * math.ceil(student.vocab_size / tp) * 4  # both models' logits, log-softmaxes, the gradient
    forward_flops = build_model(model, device="meta").flops_per_token(seq) / 3  # forward: a third of fwd + bwd
    return {"runs": True, "local_parameters": params, "weights": 2 * params, "activations": block + kept,
            "kl_chunks": kl, "total": 2 * params + block + kept + kl,
            # The teacher's forward, its lm_head included; the student's logits and their two gradient
            # matmuls replace pretraining's fused loss one for one.
            "flops_per_token": forward_flops}


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


def plan(config: str, tp: int, dp: int, gpu: str, micro_batch: int, seq: int | None, ac: str, sp: bool, mfu: float,
         teacher: str | None = None, teacher_fsdp: bool = False) -> dict:
    """The per-GPU memory and predicted speed of a run; with ``teacher`` (a Qwen2.5 name), of distilling from it."""
    cfg = load_config(config)
    seq = seq or cfg.data.seq_len
    cfg.parallel.sequence_parallel = sp
    params = local_parameter_count(cfg.model, cfg.parallel, tp, dp)
    expected = closed_form_parameters(cfg.model, tp, dp)
    if params != expected:
        raise AssertionError(f"meta-device shards hold {params:,} parameters, the closed form says {expected:,}")
    memory_gib, peak = GPUS[gpu]
    acts = activation_bytes(cfg.model, micro_batch, seq, tp, sp and tp > 1, ac)
    states = {"parameters_fp32": 4 * params, "gradients_fp32": 4 * params, "adamw_state_fp32": 8 * params}
    total = sum(states.values()) + acts["total"] + RESERVED_GIB * GIB
    flops_per_token = build_model(cfg.model, device="meta").flops_per_token(seq)
    distilling = {}
    if teacher:
        extra = teacher_bytes(teacher, cfg.model, cfg.parallel, tp, dp, micro_batch, seq, teacher_fsdp)
        distilling = {"teacher": teacher, "teacher_fsdp": teacher_fsdp, "teacher_runs": extra["runs"],
                      "teacher_reason": extra.get("reason", "")}
        if extra["runs"]:
            total += extra["total"]
            flops_per_token += extra["flops_per_token"]
            distilling.update({"teacher_local_parameters": extra["local_parameters"],
                               "teacher_weights_bf16_gib": extra["weights"] / GIB,
                               "teacher_activations_gib": extra["activations"] / GIB,
                               "kl_chunks_gib": extra["kl_chunks"] / GIB})
    tokens_per_s = tp * dp * peak * mfu / flops_per_token
    fits = total / GIB <= memory_gib and distilling.get("teacher_runs", True)
    return {
        "config": config, "gpu": gpu, "tp": tp, "dp": dp, "micro_batch": micro_batch, "seq_len": seq,
        "activation_checkpoint": ac, "sequence_parallel": sp, "local_parameters": params,
        **{f"{k}_gib": v / GIB for k, v in states.items()},
        "activations_per_layer_gib": acts["per_layer"] / GIB, "activations_gib": acts["layers"] / GIB,
        "logits_and_loss_gib": acts["logits"] / GIB, "reserved_gib": RESERVED_GIB,
        **distilling, "total_gib": total / GIB, "gpu_gib": memory_gib, "fits": fits,
        "mfu": mfu, "predicted_tokens_per_s": tokens_per_s,
        "predicted_days_for_21.9B_tokens": 21.9e9 / tokens_per_s / 86400,
    }

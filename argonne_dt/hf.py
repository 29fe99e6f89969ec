"""The one mapping between our parameter names and Hugging Face ``LlamaForCausalLM``'s.

Our model is exactly a Llama with an explicit ``head_dim``, tied embeddings and no biases, so
the mapping is a renaming: no tensor is permuted (both use the rotate-half RoPE layout).
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def to_hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face Llama name (``lm_head.weight`` is the tied embedding)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise KeyError(f"parameter {name!r} has no Hugging Face Llama counterpart")


def from_hf_name(hf_name: str) -> str:
    for ours, theirs in _TOP_NAMES.items():
        if hf_name == theirs:
            return ours
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match:
        for ours, theirs in _LAYER_NAMES.items():
            if match.group(2) == theirs:
                return f"layers.{match.group(1)}.{ours}"
    raise KeyError(f"Hugging Face parameter {hf_name!r} has no counterpart in ArgonneModel")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our state dict to Llama's; the tied lm_head is left out, as Llama checkpoints do."""
    return {to_hf_name(k): v for k, v in state_dict.items() if k != "lm_head.weight"}


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Llama state dict to ours; an ``lm_head.weight`` must equal the embedding (tied)."""
    ours = {}
    for name, tensor in hf_state_dict.items():
        if name == "lm_head.weight":
            embed = hf_state_dict.get("model.embed_tokens.weight")
            if embed is not None and not torch.equal(embed, tensor):
                raise ValueError("lm_head.weight differs from model.embed_tokens.weight: Argonne ties them")
            continue
        ours[from_hf_name(name)] = tensor
    return ours


def llama_config(cfg: ModelConfig, torch_dtype: torch.dtype = torch.float32, bos_token_id=None, eos_token_id=None):
    """A ``transformers.LlamaConfig`` of exactly our architecture."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
        torch_dtype=torch_dtype,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )

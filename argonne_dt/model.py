"""The Argonne 2.0 decoder as plain single-device modules.

LLaMA-style: pre-norm blocks of grouped-query attention and a SwiGLU MLP, RMSNorm computed in
fp32, rotary positions (rotate-half, the Hugging Face Llama convention) and a tied lm_head.
No distributed code lives here: ``parallelize.py`` shards these modules from outside, which is
why attention takes its head count from the tensors it receives, not from the config.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .loss import cross_entropy_loss, fused_linear_cross_entropy


LocalView = Callable[[torch.Tensor], tuple[torch.Tensor, Sequence[int], Sequence[int]]]
_INIT_ROWS_PER_SEED = 256


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def seeded_normal_(out: torch.Tensor, std: float, seed: int, offset: Sequence[int], full_shape: Sequence[int]) -> None:
    """Fill ``out`` with its block of a deterministic N(0, std) matrix of ``full_shape``.

    The full matrix is defined in bands of 256 rows, each drawn from its own seed, so a rank
    holding any row or column range draws only the bands it overlaps, and the values are the same
    whatever the sharding (tensor parallel, FSDP, or one device).
    """
    row0, col0 = offset
    rows, cols = out.shape
    full_cols = full_shape[1]
    generator = torch.Generator(device=out.device)
    for band in range(row0 // _INIT_ROWS_PER_SEED, -(-(row0 + rows) // _INIT_ROWS_PER_SEED)):
        band_start = band * _INIT_ROWS_PER_SEED
        band_rows = min(_INIT_ROWS_PER_SEED, full_shape[0] - band_start)
        generator.manual_seed(seed + band)
        values = torch.randn(band_rows, full_cols, generator=generator, device=out.device, dtype=torch.float32)
        lo, hi = max(row0, band_start), min(row0 + rows, band_start + band_rows)
        out[lo - row0 : hi - row0] = values[lo - band_start : hi - band_start, col0 : col0 + cols].mul_(std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics whatever the compute dtype: bf16 sums of squares lose too much.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * normed.type_as(x)
        device = out.device.type
        if torch.is_autocast_enabled(device):
            # The residual stream stays fp32; what goes on to the matmuls (and, under sequence
            # parallelism, through the all-gather in front of them) is already the compute dtype.
            out = out.to(torch.get_autocast_dtype(device))
        return out


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim) in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, heads, T, head_dim) by tables of shape (T, head_dim)."""
    return (x * cos + _rotate_half(x) * sin).type_as(x)


@dataclass
class KVCache:
    """Keys and values of past positions for one attention layer, shape (B, kv_heads, max_len, head_dim)
    (head_dim padded to a multiple of 8 with ``model.pad_head_dim``)."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> KVCache:
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; position {end - 1} requested")
        self.keys[:, :, start_pos:end] = k.to(self.keys.dtype)
        self.values[:, :, start_pos:end] = v.to(self.values.dtype)
        return self.keys[:, :, :end], self.values[:, :, :end]


def _pad_last_dim(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.pad_head_dim = cfg.pad_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1: the local head count, which is num_heads / tp once the projections are sharded.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.pad_head_dim:
            # The memory-efficient and cuDNN kernels want head_dim % 8 == 0 (flash pads by itself);
            # zero padding leaves q.k and the used part of the output unchanged, and the scale stays
            # that of the true head_dim. Padded before the cache, so the cache holds the padded
            # width and a decoded token pads only itself.
            q, k, v = (_pad_last_dim(t, 8) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        mask = attention_mask(seq, k.shape[2], start_pos, key_mask, x.device)
        scale = 1.0 / math.sqrt(self.head_dim)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1, scale=scale, enable_gqa=True
        )
        out = out[..., : self.head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def attention_mask(seq: int, keys: int, start_pos: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (.., seq, keys) mask, or None when plain causal attention (or none) is exact.

    ``key_mask`` (B, >= keys) marks real tokens (False for padding). A query always sees itself,
    so padded rows stay finite instead of softmax over nothing.
    """
    if key_mask is None and (start_pos == 0 or seq == 1):
        return None
    query_pos = torch.arange(start_pos, start_pos + seq, device=device)[:, None]
    key_pos = torch.arange(keys, device=device)[None, :]
    mask = query_pos >= key_pos
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :keys]) | (query_pos == key_pos)
    return mask


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0, key_mask=None):
        # By keyword: tensor-parallel input preparation covers the positional args only.
        x = x + self.attn(self.attn_norm(x), cos, sin, cache=cache, start_pos=start_pos, key_mask=key_mask)
        return x + self.mlp(self.mlp_norm(x))


class ArgonneModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.use_loss_path(fused_chunk=1024)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def use_loss_path(self, fused_chunk: int) -> None:
        """How ``forward(tokens, targets=...)`` computes the loss: ``fused_chunk`` tokens per chunk of the
        fused lm_head + loss (``train.loss_chunk_tokens``; 0: full logits, then cross-entropy, under
        ``loss.loss_context(layout)``); at any tensor-parallel degree, a vocab-sharded lm_head making
        it the vocab-parallel fused loss."""
        self.fused_loss_chunk = fused_chunk

    def tie_weights(self) -> None:
        """One parameter for embedding and lm_head (call again after anything replaces either);
        nothing for an untied model (``model.tie_embeddings = false``)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rotary tables and the embedding / lm_head tie: all a model needs after ``to_empty``
        besides parameter values (which ``init_weights`` or a checkpoint provides)."""
        self.tie_weights()
        cfg = self.config
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def init_std(self, name: str) -> float | None:
        """Std of the normal init of parameter ``name``; None for norm weights (ones) and biases (zeros)."""
        if name.endswith(("norm.weight", ".bias")):
            return None
        if name.endswith(("attn.o_proj.weight", "mlp.down_proj.weight")):
            return self.config.init_std / math.sqrt(2 * self.config.num_layers)
        return self.config.init_std

    @torch.no_grad()
    def init_weights(self, seed: int = 0, local_view: LocalView | None = None) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2 * layers); norms 1.

        The values depend only on ``seed`` and the parameter's name, not on how it is sharded:
        ``local_view(param)`` returns (local tensor, its offset in the full tensor, the full shape)
        for a sharded parameter, and each rank fills just its block. Also recomputes the rotary
        tables and the tie, so a model built on the meta device and moved with ``to_empty``
        (which unties shared parameters) is complete after this call.
        """
        self.init_buffers()
        for name, param in self.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "")
            local, offset, full_shape = local_view(param) if local_view else (param, (0,) * param.ndim, param.shape)
            std = self.init_std(name)
            if std is None:
                local.fill_(0.0 if name.endswith(".bias") else 1.0)
            else:
                seeded_normal_(local, std, _name_seed(seed, name), offset, full_shape)

    def forward(
        self,
        tokens: torch.Tensor,
        caches: list[KVCache] | None = None,
        start_pos: int = 0,
        key_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        head: Callable | None = None,
    ):
        """Logits of shape (B, T, vocab) for token ids of shape (B, T), or with ``targets`` the mean loss.

        With ``caches`` (one per layer) the tokens are positions ``start_pos ...`` of a sequence
        whose earlier keys and values are in the caches, which this call extends. ``key_mask``
        (B, positions so far) is False at padding that no token may attend to. With ``targets``
        and ``fused_loss_chunk`` set, the logits are never materialized in full (see
        ``fused_linear_cross_entropy``). ``head(model, hidden, targets)`` replaces the lm_head and
        loss on the final hidden states: it runs inside ``forward``, where FSDP2 has the lm_head
        gathered (a second objective's loss; ``lambda model, hidden, targets: hidden`` for the states).
        """
        seq = tokens.shape[1]
        cos = self.rope_cos[start_pos : start_pos + seq]
        sin = self.rope_sin[start_pos : start_pos + seq]
        # The residual stream is fp32 also when the weights arrive in bf16 (FSDP2's gathers).
        h = self.embed(tokens).float()
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, caches[i] if caches is not None else None, start_pos, key_mask)
        h = self.norm(h)
        if head is not None:
            return head(self, h, targets)
        if targets is None:
            return self.lm_head(h)
        return self.loss_from_hidden(h, targets)

    def loss_from_hidden(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of the final hidden states, by the declared loss path."""
        if self.fused_loss_chunk:
            return fused_linear_cross_entropy(hidden, self.lm_head.weight, targets, self.fused_loss_chunk)
        return cross_entropy_loss(self.lm_head(hidden), targets)

    def new_kv_caches(self, batch: int, max_len: int, dtype=None) -> list[KVCache]:
        """Empty per-layer caches sized from the (possibly sharded) k projection.

        The default dtype is the one keys and values are computed in: the autocast dtype when
        autocast is on (an fp32 cache would double its memory and upcast every step), else the weights'.
        """
        device = self.rope_cos.device
        if dtype is None and torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        head_dim = self.config.head_dim
        width = head_dim + (-head_dim % 8 if self.config.pad_head_dim else 0)  # what attention pads to
        caches = []
        for block in self.layers:
            weight = block.attn.k_proj.weight
            local_rows = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
            caches.append(KVCache.empty(batch, local_rows // head_dim, max_len, width, dtype or weight.dtype, device))
        return caches

    def num_parameters(self) -> int:
        """Parameter count with the tied embedding / lm_head counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward, no recompute): 6 per parameter per token
        (2 forward, 4 backward) plus 12 * layers * heads * head_dim * seq_len for attention scores
        and values (the PaLM paper's accounting, as Megatron-LM and torchtitan use for MFU).

        The embedding lookup costs nothing, but the lm_head matmul costs 2 * V * D forward: a tied
        model's one V x D parameter is counted once (as the lm_head), an untied model's embedding
        not at all.
        """
        cfg = self.config
        embedding_lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
        attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
        return 6 * (self.num_parameters() - embedding_lookup) + attention

"""The one mapping between our parameter names and Hugging Face ``LlamaForCausalLM``'s (and Qwen2's).

Our model is exactly a Llama with an explicit ``head_dim``, tied embeddings and no biases, so
the mapping is a renaming: no tensor is permuted (both use the rotate-half RoPE layout). The
same modules with q/k/v biases and an untied lm_head are a Qwen2 model: distillation teachers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint import write_model_checkpoint
from .inference import load_model
from .config import Config, ModelConfig
from .distributed import DTYPES
from .metrics import ProgressReporter
from .parallelize import build_model
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer


class HuggingFaceFormatError(ValueError):
    """A Hugging Face directory (or a model for one) that this mapping cannot read or write; the message
    names the file and what does not fit."""

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def to_hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face Llama / Qwen2 name."""
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


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """Rename our state dict to Llama's; a tied lm_head is left out, as Llama checkpoints do."""
    return {to_hf_name(k): v for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}


def check_tied(embedding: torch.Tensor, lm_head: torch.Tensor, source: str = "") -> None:
    """Argonne ties lm_head to the embedding: a separate ``lm_head.weight`` must equal it."""
    if not torch.equal(embedding.to(lm_head.dtype), lm_head):
        raise HuggingFaceFormatError(f"{source}lm_head.weight differs from model.embed_tokens.weight: Argonne ties them, "
                         "so this model cannot be represented")


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """Rename a Llama state dict to ours; when ``tied``, an ``lm_head.weight`` beside the embedding must equal it."""
    embed, lm_head = hf_state_dict.get("model.embed_tokens.weight"), hf_state_dict.get("lm_head.weight")
    if tied and embed is not None and lm_head is not None:
        check_tied(embed, lm_head)
    return {from_hf_name(name): tensor for name, tensor in hf_state_dict.items()
            if not (tied and name == "lm_head.weight")}


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
        dtype=torch_dtype,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        architectures=["LlamaForCausalLM"],
    )


def model_config_from_hf(config: dict, source: str, argonne_shaped: bool = True) -> ModelConfig:
    """Our ModelConfig from a Hugging Face Llama or Qwen2 ``config.json``; refuses what we cannot represent.

    ``argonne_shaped``: also refuse biases and an untied lm_head (a model training starts from);
    a distillation teacher may have both.
    """
    problems = []
    model_type = config.get("model_type")
    if config.get("auto_map"):
        problems.append("custom modelling code (auto_map); argonne_dt never runs trust_remote_code")
    if model_type not in ("llama", "qwen2", None):
        problems.append(f"model_type={model_type!r} (supported: 'llama', 'qwen2')")
    attention_bias = model_type == "qwen2" or bool(config.get("attention_bias"))
    tied = bool(config.get("tie_word_embeddings", False))
    if argonne_shaped and not tied:
        problems.append("tie_word_embeddings=false (Argonne ties embedding and lm_head)")
    if argonne_shaped and attention_bias:
        problems.append("biases in attention")
    if config.get("mlp_bias"):
        problems.append("biases in the MLP")
    if config.get("use_sliding_window"):
        problems.append("sliding-window attention (use_sliding_window=true)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.get('hidden_act')!r} (expected 'silu')")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope} (only plain RoPE)")
    if problems:
        kind = "an Argonne-shaped Llama" if argonne_shaped else "a Llama or Qwen2 model argonne_dt can run"
        raise HuggingFaceFormatError(f"{source}: not {kind}: " + "; ".join(problems))
    heads = config["num_attention_heads"]
    return ModelConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        init_std=config.get("initializer_range", 0.02),
        attention_bias=attention_bias,
        tie_embeddings=tied,
    )


_INDEX = "model.safetensors.index.json"


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bf16", max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a checkpoint as a Hugging Face Llama directory that ``from_pretrained`` loads offline.

    config.json, generation_config.json, safetensors weights (sharded above ``max_shard_bytes``,
    with an index) and the tokenizer files. The weights are loaded once; each shard's tensors are
    converted to ``dtype`` only while that shard is written.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise HuggingFaceFormatError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model, cfg = load_model(checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    bos, eos, pad = tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llama_config(cfg.model, DTYPES[dtype], bos, eos).save_pretrained(out)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(out)
    _prepend_bos(tokenizer, BOS_TOKEN if cfg.data.add_bos else None).save_pretrained(out)

    weights = to_hf_state_dict(model.state_dict())
    itemsize = torch.finfo(DTYPES[dtype]).bits // 8
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for old in list(out.glob("model*.safetensors")) + list(out.glob(_INDEX)):
        old.unlink()
    weight_map = {}
    progress = ProgressReporter(len(shards), f"writing {out}", "shards")
    for number, names in enumerate(shards, 1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: weights[n].to(DTYPES[dtype]).contiguous() for n in names}, str(out / filename),
                  metadata={"format": "pt"})
        weight_map.update({n: filename for n in names})
        progress.advance()
    if len(shards) > 1:
        total = sum(t.numel() * itemsize for t in weights.values())
        (out / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _prepend_bos(tokenizer, bos_token: str | None):
    """A copy of ``tokenizer`` whose ``tokenizer(text)`` starts with ``bos_token``, as training and
    ``generate`` put it before every document; Hugging Face users then condition the model alike."""
    import copy

    from tokenizers import processors

    if bos_token is None:
        return tokenizer
    exported = copy.deepcopy(tokenizer)
    backend = exported.backend_tokenizer
    bos = (bos_token, exported.convert_tokens_to_ids(bos_token))
    template = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B:1",
                                             special_tokens=[bos])
    existing = backend.post_processor
    backend.post_processor = template if existing is None else processors.Sequence([existing, template])
    return exported


def import_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer: str = "qwen2.5") -> Path:
    """A Llama-format Hugging Face directory (safetensors) -> a DCP checkpoint training can start from.

    Use it with ``--checkpoint.initial_load_path=OUT`` and a config of the same model shape.
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    source = hf_dir / "config.json"
    if not source.exists():
        raise HuggingFaceFormatError(f"{source} not found: not a Hugging Face model directory")
    cfg = Config()
    cfg.model = model_config_from_hf(json.loads(source.read_text()), str(source))
    cfg.data.tokenizer = tokenizer
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise HuggingFaceFormatError(f"{hf_dir}: no *.safetensors weights (convert .bin weights with transformers first)")
    model = build_model(cfg.model)  # allocated, not initialized: every weight comes from the files
    expected = model.state_dict()
    loaded, lm_head = set(), None
    progress = ProgressReporter(len(files), f"reading {hf_dir}", "files")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        lm_head = tensors.pop("lm_head.weight", lm_head)  # checked against the embedding once all is read
        ours = from_hf_state_dict(tensors)
        for name, tensor in ours.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise HuggingFaceFormatError(f"{path}: {to_hf_name(name)} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(expected[name].shape)}")
        model.load_state_dict(ours, strict=False)
        loaded.update(ours)
        progress.advance()
    missing = set(expected) - loaded - {"lm_head.weight"}
    if missing:
        raise HuggingFaceFormatError(f"{hf_dir}: weights missing for {sorted(missing)[:5]}")
    if lm_head is not None:
        check_tied(model.embed.weight, lm_head, f"{hf_dir}: ")
    return write_model_checkpoint(model, cfg, out_dir)

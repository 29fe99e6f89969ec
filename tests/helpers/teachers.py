"""A small random Qwen2 teacher written as Hugging Face does, the student it teaches, batches, and the
full-logits reference the distillation tests compare against."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from argonne_dt.config import Config, DistillConfig
from argonne_dt.model import ArgonneModel
from helpers.models import odd_model_config

STUDENT_VOCAB, TEACHER_VOCAB, SEQ = 1001, 1024, 16


def write_qwen2_teacher(directory, vocab_size: int = TEACHER_VOCAB, hidden: int = 64, **overrides) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, **overrides)
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random biases: zeros would not prove they are loaded
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def student_config(teacher: str, chunk_tokens: int = 1024, **distill) -> Config:
    """``chunk_tokens``: the loss's chunk (``train.loss_chunk_tokens``, which the trainer gives the student)."""
    cfg = Config()
    cfg.model = odd_model_config(vocab_size=STUDENT_VOCAB)
    cfg.data.seq_len = SEQ
    cfg.train.loss_chunk_tokens = chunk_tokens
    cfg.distill = replace(DistillConfig(teacher=teacher, teacher_dtype="fp32"), **distill)
    return cfg


def batch_of(rows: int, seed: int = 1) -> dict:
    tokens = torch.randint(0, STUDENT_VOCAB, (rows, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return {"input": tokens[:, :-1], "target": tokens[:, 1:]}


def reference(student: ArgonneModel, teacher_dir: str, batch: dict, alpha: float, temperature: float):
    """Full logits of both models, Hugging Face's teacher cut to the student's vocabulary, F.kl_div."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        teacher_logits = hf(batch["input"]).logits[..., :STUDENT_VOCAB].flatten(0, 1)
    logits = student(batch["input"]).flatten(0, 1)
    ce = F.cross_entropy(logits, batch["target"].flatten())
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                  log_target=True, reduction="sum") / logits.shape[0]
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    loss.backward()
    return {"loss": loss.item(), "ce": ce.item(), "kl": kl.item()}, {n: p.grad for n, p in student.named_parameters()}

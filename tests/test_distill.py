"""Knowledge distillation on one process against a plain reference: a small random Qwen2 teacher (q/k/v
biases, untied, its vocabulary padded beyond the student's), written by the tests as Hugging Face does.
Under TP 2, dp 2 and the trainer: test_distill_parallel.py."""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from argonne_dt.config import Config, ConfigError, DistillConfig, load_config
from argonne_dt.distill import DistillationObjective, TeacherError, load_teacher
from argonne_dt.model import ArgonneModel
from helpers.comparisons import max_relative_error
from helpers.teachers import STUDENT_VOCAB, batch_of, reference, student_config, write_qwen2_teacher


def objective_terms(student, teacher, spec: DistillConfig, batch: dict, autocast=None) -> dict:
    from argonne_dt.loss import loss_context

    objective = DistillationObjective(teacher, spec, torch.device("cpu"))
    with autocast or contextlib.nullcontext(), loss_context(None):
        terms = objective(student, batch, torch.device("cpu"))
        terms["loss"].backward()
    return {k: v.item() for k, v in terms.items()}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_and_every_student_gradient_equal_the_full_logits_reference(teacher_dir, temperature):
    cfg = student_config(teacher_dir, alpha=0.3, temperature=temperature, chunk_tokens=7)  # chunks cut mid-row
    student = ArgonneModel(cfg.model)
    student.use_loss_path(fused_chunk=cfg.train.loss_chunk_tokens)
    twin = copy.deepcopy(student)
    expected, grads = reference(twin, teacher_dir, batch_of(3), 0.3, temperature)
    terms = objective_terms(student, load_teacher(cfg, None, torch.device("cpu")), cfg.distill, batch_of(3))
    for key in ("loss", "ce", "kl"):
        assert abs(terms[key] - expected[key]) <= 1e-5 * max(1.0, abs(expected[key])), key
    assert expected["kl"] > 0.01
    for name, param in student.named_parameters():
        assert max_relative_error(param.grad, grads[name]) < 1e-5, name


def test_accumulated_halves_and_a_scaled_loss_give_the_full_batch_gradients(teacher_dir):
    """The distillation backward uses its incoming gradient: accumulation over n micro-batches (each
    loss divided by n) and a scaled loss scale the gradients, not n times too large."""
    from argonne_dt.step import accumulate_gradients

    cfg = student_config(teacher_dir, alpha=0.3, temperature=2.0, chunk_tokens=7)
    student = ArgonneModel(cfg.model)
    student.use_loss_path(fused_chunk=cfg.train.loss_chunk_tokens)
    scaled = copy.deepcopy(student)
    _, grads = reference(copy.deepcopy(student), teacher_dir, batch_of(4), 0.3, 2.0)
    objective = DistillationObjective(load_teacher(cfg, None, torch.device("cpu")), cfg.distill, torch.device("cpu"))
    halves = [{k: v[rows] for k, v in batch_of(4).items()} for rows in (slice(0, 2), slice(2, 4))]
    accumulate_gradients(student, halves, torch.device("cpu"), contextlib.nullcontext(), None, objective)
    (0.5 * objective(scaled, batch_of(4), torch.device("cpu"))["loss"]).backward()
    scaled_grads = dict(scaled.named_parameters())
    for name, param in student.named_parameters():
        assert max_relative_error(param.grad, grads[name]) < 1e-5, name
        assert max_relative_error(scaled_grads[name].grad, 0.5 * grads[name]) < 1e-5, name


def test_the_teacher_is_hugging_face_qwen2_cut_to_the_student_vocabulary(teacher_dir):
    from transformers import Qwen2ForCausalLM

    teacher = load_teacher(student_config(teacher_dir), None, torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert teacher.lm_head.weight is not teacher.embed.weight and teacher.layers[0].attn.q_proj.bias is not None
    hf = Qwen2ForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32)
    tokens = batch_of(2)["input"]
    with torch.no_grad():
        assert max_relative_error(teacher(tokens), hf(tokens).logits[..., :STUDENT_VOCAB]) < 2e-5


def test_alpha_one_is_exactly_the_pretraining_loss_and_gradients(teacher_dir):
    cfg = student_config(teacher_dir, alpha=1.0, teacher_dtype="bf16")
    student = ArgonneModel(cfg.model)
    plain = copy.deepcopy(student)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)  # the default path: bf16 autocast, the fused loss
    terms = objective_terms(student, load_teacher(cfg, None, torch.device("cpu")), cfg.distill, batch_of(2), bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = plain(batch_of(2)["input"], targets=batch_of(2)["target"])
    loss.backward()
    assert terms["loss"] == terms["ce"] == loss.item() and terms["kl"] > 0
    plain_grads = dict(plain.named_parameters())
    assert all(torch.equal(p.grad, plain_grads[n].grad) for n, p in student.named_parameters())


def test_a_teacher_equal_to_the_student_gives_kl_zero(tmp_path):
    from argonne_dt.checkpoint import write_model_checkpoint

    cfg = student_config("")
    student = ArgonneModel(cfg.model)
    cfg.distill.teacher = str(write_model_checkpoint(student, cfg, tmp_path / "same"))
    terms = objective_terms(student, load_teacher(cfg, None, torch.device("cpu")), cfg.distill, batch_of(2))
    assert abs(terms["kl"]) < 1e-6 and terms["ce"] > 1.0


def _refusal(directory, cfg: Config) -> str:
    with pytest.raises(TeacherError) as err:
        load_teacher(cfg, None, torch.device("cpu"))
    return str(err.value)


def test_teachers_that_cannot_teach_are_refused_with_the_reason(tmp_path, teacher_dir):
    small = write_qwen2_teacher(tmp_path / "small", vocab_size=900)
    assert "vocab_size=900 does not cover the student's 1001 token ids" in _refusal(small, student_config(small))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((Path(teacher_dir) / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    message = _refusal(pickled, student_config(str(pickled)))
    assert "no *.safetensors weights (pytorch_model.bin are pickle files, which are never loaded" in message

    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe",
                                                    "auto_map": {"AutoModel": "modeling.Model"}}))
    message = _refusal(remote, student_config(str(remote)))
    assert "custom modelling code (auto_map); argonne_dt never runs trust_remote_code" in message
    assert "model_type='qwen3_moe' (supported: 'llama', 'qwen2')" in message


def test_a_teacher_tokenizer_that_maps_ids_otherwise_is_refused(tmp_path):
    from argonne_dt.tokenizer import load_tokenizer

    cfg = student_config("")
    cfg.model = replace(cfg.model, vocab_size=151_665)
    ours = load_tokenizer("qwen2.5")
    same = write_qwen2_teacher(tmp_path / "same", vocab_size=152_064, hidden=16)
    ours.save_pretrained(same)
    load_teacher(replace(cfg, distill=replace(cfg.distill, teacher=same)), None, torch.device("cpu"))

    other = write_qwen2_teacher(tmp_path / "other", vocab_size=152_064, hidden=16)
    ours.save_pretrained(other)
    tokenizer = json.loads((tmp_path / "other" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    swapped = {v: k for k, v in vocab.items()}
    vocab[swapped[997]], vocab[swapped[1994]] = 1994, 997  # two tokens trade ids
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(tokenizer))
    message = _refusal(other, replace(cfg, distill=replace(cfg.distill, teacher=other)))
    assert "the teacher's tokenizer maps ids differently from the student's" in message
    assert f"id 997: {swapped[997]!r} here, {swapped[1994]!r} there" in message


def test_distill_tiny_is_tiny_plus_a_teacher_and_bad_values_are_named():
    distill, tiny = load_config("distill-tiny.toml"), load_config("tiny.toml")
    assert distill.distill.teacher == "runs/tiny" and tiny.distill.teacher == ""
    for section in ("model", "parallel", "data", "optim", "train", "checkpoint", "metrics"):
        assert getattr(distill, section) == getattr(tiny, section), section
    assert load_config("distill-4b9.toml").train == load_config("4b9.toml").train
    with pytest.raises(ConfigError, match=r"distill.alpha=1.5 must be between 0 and 1"):
        load_config("distill-tiny.toml", ["--distill.alpha=1.5"])

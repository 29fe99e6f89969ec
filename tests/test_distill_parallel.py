"""Knowledge distillation under tensor and data parallelism against one device (TP 2, dp 2 and dp 2 with
an FSDP-sharded teacher), and the distillation run: the pretraining trainer with the distillation
objective (TP 2, gloo), resumed bit for bit, its teacher kept out of checkpoints."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from argonne_dt.distill import DistillationObjective, load_teacher
from argonne_dt.model import ArgonneModel
from helpers.comparisons import max_relative_error, unwrapped_name
from helpers.processes import run_distributed
from helpers.runs import make_config, sigterm_after_step
from helpers.teachers import batch_of, reference, student_config, write_qwen2_teacher


# Tensor parallel and data parallel (FSDP2, the teacher replicated or sharded) against one device.

def _parallel_cases(teacher: str) -> dict:
    import torch.distributed as dist

    from argonne_dt.config import ParallelConfig
    from argonne_dt.distributed import build_layout, full_value
    from argonne_dt.parallelize import build_model
    from argonne_dt.step import accumulate_gradients

    results = {}
    cases = {"tp2": (dict(tp=2), False), "dp2": (dict(tp=1), False), "dp2_teacher_fsdp": (dict(tp=1), True)}
    for name, (parallel, teacher_fsdp) in cases.items():
        cfg = student_config(teacher, alpha=0.4, temperature=2.0, chunk_tokens=5, teacher_fsdp=teacher_fsdp)
        cfg.parallel = ParallelConfig(**parallel)
        layout = build_layout(cfg.parallel, "cpu")
        student = build_model(cfg.model, layout, "cpu", seed=4)
        student.use_loss_path(fused_chunk=cfg.train.loss_chunk_tokens)
        teacher_model = load_teacher(cfg, layout, torch.device("cpu"))
        full = batch_of(4, seed=5)
        local = {k: v.chunk(layout.dp)[layout.dp_rank] for k, v in full.items()}
        objective = DistillationObjective(teacher_model, cfg.distill, torch.device("cpu"))
        terms = accumulate_gradients(student, [local], torch.device("cpu"), contextlib.nullcontext(), layout,
                                     objective)
        sums = torch.stack([terms[k] for k in ("loss", "ce", "kl")])
        dist.all_reduce(sums)
        one = build_model(cfg.model, None, "cpu", seed=4)
        expected, grads = reference(one, teacher, full, 0.4, 2.0)
        results[name] = {
            "terms": (sums / dist.get_world_size()).tolist(), "expected": [expected[k] for k in ("loss", "ce", "kl")],
            "grad_errors": {unwrapped_name(n): max_relative_error(full_value(p.grad), grads[n])
                            for n, p in student.named_parameters()},
        }
    return results


@pytest.mark.distributed
def test_tp2_and_dp2_distillation_equal_one_device(teacher_dir):
    per_rank = run_distributed(_parallel_cases, 2, teacher_dir, timeout_s=300)
    for name, result in per_rank[0].items():
        for got, expected in zip(result["terms"], result["expected"]):
            assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (name, got, expected)
        worst = max(result["grad_errors"].items(), key=lambda item: item[1])
        assert worst[1] < 1e-5, (name, worst)


# The distillation run: the pretraining trainer with the distillation objective (TP 2, gloo).

def _distill_jobs(tmp: str, corpus_dir: str, teacher: str) -> dict:
    from argonne_dt import distill as distilling
    from argonne_dt.distributed import full_value
    from argonne_dt.trainer import train

    loaded, real_load = [], distilling.load_teacher

    def recording_load(cfg, layout, device):
        model = real_load(cfg, layout, device)
        loaded.append((model, {n: full_value(p).clone() for n, p in model.named_parameters()}))
        return model

    distilling.load_teacher = recording_load
    settings = {"parallel.tp": 2, "distill.teacher": teacher, "distill.teacher_dtype": "fp32",
                "distill.alpha": 0.5, "distill.temperature": 2.0, "train.loss_chunk_tokens": 24}
    try:
        out = {"full": distilling.distill(make_config(f"{tmp}/full", corpus_dir, **settings)),
               "first": distilling.distill(make_config(f"{tmp}/resumed", corpus_dir, **settings),
                                           on_step=sigterm_after_step(3)),
               "second": distilling.distill(make_config(f"{tmp}/resumed", corpus_dir, **settings)),
               "alpha_one": distilling.distill(make_config(f"{tmp}/alpha_one", corpus_dir, **{
                   **settings, "distill.alpha": 1.0, "train.steps": 3})),
               "pretraining": train(make_config(f"{tmp}/pretraining", corpus_dir, **{
                   "parallel.tp": 2, "train.steps": 3, "train.loss_chunk_tokens": 24}))}
    finally:
        distilling.load_teacher = real_load
    out["teacher_unchanged"] = all(torch.equal(full_value(p), before[n]) for model, before in loaded
                                   for n, p in model.named_parameters())
    return out


@pytest.fixture(scope="module")
def trainer_teacher(tmp_path_factory) -> str:
    """A Qwen2 teacher of the real vocabulary (152,064 rows, padded) with Qwen2.5's tokenizer files."""
    from argonne_dt.tokenizer import load_tokenizer

    directory = write_qwen2_teacher(tmp_path_factory.mktemp("qwen2_vocab"), vocab_size=152_064, hidden=32)
    load_tokenizer("qwen2.5").save_pretrained(directory)
    return directory


@pytest.mark.distributed
@pytest.mark.e2e
def test_distillation_trains_resumes_exactly_and_keeps_the_teacher_out_of_checkpoints(tmp_path, corpus, trainer_teacher):
    import torch.distributed.checkpoint as dcp

    from argonne_dt.checkpoint import complete_checkpoints

    tmp = str(tmp_path)
    results = run_distributed(_distill_jobs, 2, tmp, corpus, trainer_teacher, timeout_s=600)
    full, first, second = (results[0][k] for k in ("full", "first", "second"))
    assert first["status"] == "preempted" and first["step"] == 3 and second["status"] == "completed"
    assert {**first["losses"], **second["losses"]} == full["losses"]  # bit for bit
    assert results[0]["alpha_one"]["losses"] == results[0]["pretraining"]["losses"]
    assert all(r["teacher_unchanged"] for r in results)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert all(r["kl"] > 0 and r["ce"] > 0 for r in train_records)
    assert all(abs(r["loss"] - (0.5 * r["ce"] + 0.5 * 4.0 * r["kl"])) < 1e-4 * r["loss"] for r in train_records)
    # The checkpoint holds the student alone: its parameters (no biases, tied) and optimizer state.
    newest = complete_checkpoints(tmp_path / "full" / "checkpoints")[-1]
    keys = dcp.FileSystemReader(str(newest)).read_metadata().state_dict_metadata
    model_keys = sorted(k.removeprefix("train.model.") for k in keys if k.startswith("train.model."))
    with torch.device("meta"):
        student_names = set(ArgonneModel(make_config("unused", corpus).model).state_dict())
    assert set(model_keys) <= student_names and {"embed.weight", "layers.1.mlp.up_proj.weight"} <= set(model_keys)
    assert not any("bias" in k for k in keys)

"""Knowledge distillation: a larger teacher trains the student, on the pretraining machinery.

Per token, averaged over tokens: ``alpha * CE + (1 - alpha) * T^2 * KL(p_teacher || p_student)``,
both distributions at temperature T. Everything but the objective is the pretraining run's
(``Trainer``): data, optimizer, schedule, checkpoints, preemption, metrics.

The teacher is an ``ArgonneModel`` too (q/k/v biases and an untied lm_head cover Qwen2), made by
the model factory on the student's tensor-parallel mesh, so its logits are vocab-sharded like the
student's: its embedding and lm_head rows beyond the student's vocabulary are never read (the
teacher's distribution is renormalized over the student's ids). It is read from safetensors
straight into its shards (or from an argonne_dt checkpoint through DCP), in ``teacher_dtype``,
without gradients, outside the optimizer and the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import ModelOptimizerState, load_checkpoint, resolve_checkpoint, stored_config
from .config import Config, ConfigError, DataConfig, DistillConfig, ModelConfig, check_job
from .distributed import ParallelLayout, dtype_named, layout_of
from .hf import from_hf_name, model_config_from_hf, to_hf_name
from .loss import batch_on, distillation_loss
from .model import ArgonneModel
from .parallelize import build_model, local_view
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer
from .trainer import Trainer


class TeacherError(ConfigError):
    """A teacher that cannot teach this student; the message names the file and why."""


def _final_hidden(model, hidden, targets):
    return hidden


class DistillationObjective:
    """The objective ``Trainer`` minimizes when distilling: ``{"loss", "ce", "kl"}`` of a micro-batch.

    CE and KL come from the same chunks of both models' logits (``distillation_loss``), inside the
    student's forward, where FSDP2 has its lm_head gathered; the teacher's root (embedding, norm,
    lm_head) is never FSDP-sharded, so its lm_head is at hand too. With ``alpha = 1`` the loss is
    the student's own loss path, so loss and gradients are exactly pretraining's (the KL is logged).
    """

    def __init__(self, teacher: ArgonneModel, spec: DistillConfig, device: torch.device):
        self.teacher, self.spec = teacher, spec
        dtype = dtype_named(spec.teacher_dtype, device)
        self.teacher_precision: Callable[[], contextlib.AbstractContextManager] = partial(
            torch.autocast, device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def __call__(self, model, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        inputs, targets = batch_on(device, batch, model.config.vocab_size)
        with torch.no_grad(), self.teacher_precision():
            teacher_hidden = self.teacher(inputs, head=_final_hidden)
        return model(inputs, targets=targets, head=partial(self._loss, teacher_hidden=teacher_hidden))

    def _loss(self, student, hidden, targets, teacher_hidden) -> dict[str, torch.Tensor]:
        spec = self.spec
        distill = partial(distillation_loss, hidden, student.lm_head.weight, teacher_hidden, self.teacher.lm_head.weight,
                          targets, spec.alpha, spec.temperature, student.fused_loss_chunk, self.teacher_precision)
        if spec.alpha == 1.0:  # pretraining's loss path exactly; the KL only logged
            ce = student.loss_from_hidden(hidden, targets)
            with torch.no_grad():
                _, _, kl = distill()
            return {"loss": ce, "ce": ce.detach(), "kl": kl}
        loss, ce, kl = distill()
        return {"loss": loss, "ce": ce, "kl": kl}


def check_teacher_tokenizer(teacher_dir: Path, data: DataConfig, vocab_size: int) -> None:
    """Refuse a teacher whose ``tokenizer.json`` maps the student's ids otherwise: the special tokens
    and every 997th id (nothing to compare without the file)."""
    source = teacher_dir / "tokenizer.json"
    if not source.exists():
        return
    from tokenizers import Tokenizer

    theirs, ours = Tokenizer.from_file(str(source)), load_tokenizer(data.tokenizer).backend_tokenizer
    differing = [f"{token}: id {ours.token_to_id(token)} here, {theirs.token_to_id(token)} there"
                 for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN) if ours.token_to_id(token) != theirs.token_to_id(token)]
    differing += [f"id {i}: {ours.id_to_token(i)!r} here, {theirs.id_to_token(i)!r} there"
                  for i in [*range(0, vocab_size, 997), vocab_size - 1] if ours.id_to_token(i) != theirs.id_to_token(i)]
    if differing:
        raise TeacherError(f"{source}: the teacher's tokenizer maps ids differently from the student's "
                           f"(data.tokenizer={data.tokenizer!r}), so its distribution is over other tokens: "
                           + "; ".join(differing[:4]) + (f"; and {len(differing) - 4} more" if len(differing) > 4 else ""))


def hf_teacher_config(teacher_dir: Path, student: Config) -> tuple[ModelConfig, list[Path]]:
    """The teacher's model config (its vocabulary cut to the student's) and its safetensors files."""
    source = teacher_dir / "config.json"
    try:
        model = model_config_from_hf(json.loads(source.read_text()), str(source), argonne_shaped=False)
    except ValueError as err:
        raise TeacherError(str(err)) from None
    vocab = student.model.vocab_size
    if model.vocab_size < vocab:
        raise TeacherError(f"{source}: vocab_size={model.vocab_size} does not cover the student's {vocab} token ids "
                           f"(model.vocab_size): a teacher must score every token the student predicts")
    if model.max_seq_len < student.data.seq_len:
        raise TeacherError(f"{source}: max_position_embeddings={model.max_seq_len} is shorter than "
                           f"data.seq_len={student.data.seq_len}")
    files = sorted(teacher_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in teacher_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise TeacherError(f"{teacher_dir}: no *.safetensors weights"
                           + (f" ({', '.join(pickled)} are pickle files, which are never loaded: unpickling can run "
                              "code; convert them to safetensors)" if pickled else ""))
    check_teacher_tokenizer(teacher_dir, student.data, vocab)
    return replace(model, vocab_size=vocab, max_seq_len=student.model.max_seq_len), files


@torch.no_grad()
def fill_from_safetensors(model: ArgonneModel, files: list[Path]) -> None:
    """Copy each parameter's block on this rank from the safetensors files, reading only that block
    (``get_slice``): no rank holds a full copy. Vocabulary rows beyond the model's are not read."""
    params = dict(model.named_parameters())
    vocab_sized = {"embed.weight", "lm_head.weight"}
    filled = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and model.config.tie_embeddings:
                    continue  # a tied checkpoint that also stores the lm_head: the embedding is it
                name = from_hf_name(hf_name)
                if name not in params:
                    raise TeacherError(f"{path}: {hf_name} has no place in a model of its config.json")
                local, offset, full_shape = local_view(params[name])
                stored = f.get_slice(hf_name)
                shape = tuple(stored.get_shape())
                fits = shape[0] >= full_shape[0] and shape[1:] == tuple(full_shape[1:]) if name in vocab_sized \
                    else shape == tuple(full_shape)
                if not fits:
                    raise TeacherError(f"{path}: {hf_name} has shape {shape}, config.json implies {tuple(full_shape)}")
                local.copy_(stored[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))])
                filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise TeacherError(f"{files[0].parent}: no weights for {', '.join(to_hf_name(n) for n in missing[:4])}")


def teacher_layout(layout: ParallelLayout | None, shard_over_dp: bool) -> ParallelLayout | None:
    """The student's tensor-parallel mesh (and its dp dimension when FSDP2 shards the teacher); the
    teacher is built without the student's model transforms: it never runs backward."""
    if layout is None:
        return None
    return layout_of(layout.mesh if shard_over_dp and layout.dp > 1 else layout.tp_mesh, layout.parallel)


def load_teacher(cfg: Config, layout: ParallelLayout | None, device: torch.device) -> ArgonneModel:
    """The teacher of ``cfg.distill``, in eval mode without gradients, on the student's tp mesh."""
    check_job(cfg, distilling=True)
    spec = cfg.distill
    path = Path(spec.teacher)
    dtype = dtype_named(spec.teacher_dtype, device)
    where = teacher_layout(layout, spec.teacher_fsdp)
    if (path / "config.json").exists() and not (path / ".metadata").exists():
        model_cfg, files = hf_teacher_config(path, cfg)
        teacher = build_model(model_cfg, where, device, param_dtype=dtype, weights_dtype=dtype,
                              fill=partial(fill_from_safetensors, files=files), shard_root=False)
    else:
        checkpoint = resolve_checkpoint(path)
        model_cfg = stored_config(checkpoint).model
        if model_cfg.vocab_size != cfg.model.vocab_size:
            raise TeacherError(f"{checkpoint}: the teacher's vocabulary has {model_cfg.vocab_size} ids, the student's "
                               f"{cfg.model.vocab_size}: an argonne_dt teacher must share the student's tokenizer")
        teacher = build_model(replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, cfg.data.seq_len)), where,
                              device, param_dtype=dtype, weights_dtype=dtype, shard_root=False)
        load_checkpoint(checkpoint, ModelOptimizerState(teacher, None))
    return teacher.requires_grad_(False).eval()


def distillation(cfg: Config, layout: ParallelLayout, device: torch.device) -> tuple[DistillationObjective, float]:
    """The objective factory of a distillation run (``Trainer``): the teacher loaded on the student's
    layout, and the FLOPs per token of its forward (a third of a forward and backward)."""
    teacher = load_teacher(cfg, layout, device)
    return DistillationObjective(teacher, cfg.distill, device), teacher.flops_per_token(cfg.data.seq_len) / 3


def distill(cfg: Config, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the distillation job of ``cfg``: the pretraining run with the distillation objective."""
    check_job(cfg, distilling=True)  # before the run is built
    return Trainer(cfg, partial(distillation, cfg)).run(on_step)

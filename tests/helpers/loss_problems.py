"""Loss problems and their fp64 references, shared by the loss tests on one device and under tensor
parallelism: hidden states, lm_head weight and targets; losses with their gradients; relative errors;
the bytes the fused loss allocates."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from argonne_dt.loss import IGNORE_INDEX, distillation_loss, fused_linear_cross_entropy
from argonne_dt.metrics import PeakTensorBytes

TOKENS, WIDTH, VOCAB = 96, 64, 500


def loss_problem(kind: str, vocab: int = VOCAB, ignored: bool = False):
    """Hidden states, lm_head weight and targets whose p(target) is ~0.99999 (confident) or ~1/V (flat);
    with ``ignored``, every 5th target is ``IGNORE_INDEX``."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, WIDTH, generator=gen) / WIDTH**0.5
    targets = torch.randint(0, vocab, (TOKENS,), generator=gen)
    if kind == "confident":
        # The target's row, scaled: a logit gap of ~20 nats over the rest.
        hidden = 2.6 * weight[targets] * WIDTH**0.5 + 0.3 * torch.randn(TOKENS, WIDTH, generator=gen)
    else:
        hidden = 0.05 * torch.randn(TOKENS, WIDTH, generator=gen)
    if ignored:
        targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, dtype=torch.float32, scale: float = 1.0,
                   context=contextlib.nullcontext):
    """(loss, grad_hidden, grad_weight) in fp64 of ``scale * loss_fn(...)``'s forward and backward in ``context``."""
    hidden = hidden.detach().to(dtype, copy=True).requires_grad_()
    weight = weight.detach().to(dtype, copy=True).requires_grad_()
    with context():
        loss = loss_fn(hidden, weight, targets)
        (scale * loss).backward()
    return loss.double(), hidden.grad.double(), weight.grad.double()


def fused_bf16(hidden, weight, targets):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fused_linear_cross_entropy(hidden, weight, targets, chunk=40)


def fused_fp32(hidden, weight, targets):
    return fused_linear_cross_entropy(hidden, weight, targets, chunk=40)


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Large logits in distillation: about +-200, against an fp64 F.kl_div reference.

def large_logits_problem(vocab: int = VOCAB):
    """Student and teacher hidden states scaled so that both models' logits reach about +-200."""
    gen = torch.Generator().manual_seed(5)
    student_weight = torch.randn(vocab, WIDTH, generator=gen) / WIDTH**0.5
    teacher_weight = torch.randn(vocab, WIDTH, generator=gen) / WIDTH**0.5
    student_hidden = 60.0 * torch.randn(TOKENS, WIDTH, generator=gen)
    teacher_hidden = student_hidden + 30.0 * torch.randn(TOKENS, WIDTH, generator=gen)
    targets = torch.randint(0, vocab, (TOKENS,), generator=gen)
    targets[::7] = IGNORE_INDEX
    return student_hidden, student_weight, teacher_hidden, teacher_weight, targets


def _distillation_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, alpha, temperature):
    """(loss, CE, KL), grad_hidden, grad_weight in fp64 from full logits, F.cross_entropy and F.kl_div."""
    hidden = student_hidden.double().requires_grad_()
    weight = student_weight.double().requires_grad_()
    logits, teacher = hidden @ weight.t(), teacher_hidden.double() @ teacher_weight.double().t()
    counted = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    kl = F.kl_div(F.log_softmax(logits[counted] / temperature, -1), F.log_softmax(teacher[counted] / temperature, -1),
                  log_target=True, reduction="batchmean")
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    loss.backward()
    return torch.stack([loss, ce, kl]).detach(), hidden.grad, weight.grad


def distillation_errors(problem, alpha, temperature, shard=lambda w: w) -> dict[str, float]:
    """Relative errors of the fp32 distillation loss (weights passed through ``shard``) against fp64."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets = problem
    hidden = student_hidden.clone().requires_grad_()
    weight = student_weight.clone().requires_grad_()
    terms = distillation_loss(hidden, shard(weight), teacher_hidden, shard(teacher_weight), targets, alpha,
                              temperature, chunk=40)
    terms[0].backward()
    grad_weight = weight.grad
    expected, grad_hidden, expected_grad_weight = _distillation_reference(*problem, alpha, temperature)
    errors = {name: abs(got.item() - want.item()) / abs(want.item()) for name, got, want in
              zip(("loss", "ce", "kl"), terms, expected)}
    errors.update(grad_hidden=relative_error(hidden.grad.double(), grad_hidden),
                  grad_weight=relative_error(grad_weight.double(), expected_grad_weight))
    return errors


# Memory: what the chunk loop holds at once.

def loss_peak_bytes(hidden, weight, targets, chunk: int, dtype: torch.dtype) -> tuple[int, int]:
    """Peak bytes the fused loss allocates over its forward and backward, and its largest tensor."""
    hidden, weight = hidden.to(dtype).requires_grad_(), weight.requires_grad_()
    with PeakTensorBytes(hidden, weight) as tracker:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = fused_linear_cross_entropy(hidden, weight, targets, chunk)
        loss.backward()
    return tracker.peak, tracker.largest

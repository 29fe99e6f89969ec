"""The fused chunked lm_head + loss against an fp64 reference, and against the plain logits path."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from argonne_dt.loss import cross_entropy_loss, fused_linear_cross_entropy

TOKENS, WIDTH, VOCAB = 96, 64, 500


def _problem(kind: str):
    """Hidden states, lm_head weight and targets whose p(target) is ~0.99999 (confident) or ~1/V (flat)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, WIDTH, generator=gen) / WIDTH**0.5
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    if kind == "confident":
        # The target's row, scaled: a logit gap of ~20 nats over the rest.
        hidden = 2.6 * weight[targets] * WIDTH**0.5 + 0.3 * torch.randn(TOKENS, WIDTH, generator=gen)
    else:
        hidden = 0.05 * torch.randn(TOKENS, WIDTH, generator=gen)
    return hidden, weight, targets


def _loss_and_grads(loss_fn, hidden, weight, targets, dtype):
    hidden = hidden.detach().to(dtype, copy=True).requires_grad_()
    weight = weight.detach().to(dtype, copy=True).requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.double(), hidden.grad.double(), weight.grad.double()


def _fused(hidden, weight, targets):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fused_linear_cross_entropy(hidden, weight, targets, chunk=40)


def _plain(hidden, weight, targets):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return cross_entropy_loss(F.linear(hidden, weight)[None], targets[None])


def _reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["confident", "flat"])
def test_bf16_fused_loss_is_at_least_as_accurate_as_the_plain_bf16_path(kind):
    hidden, weight, targets = _problem(kind)
    reference = _loss_and_grads(_reference, hidden, weight, targets, torch.float64)
    if kind == "confident":
        p_target = torch.softmax(hidden.double() @ weight.double().t(), -1)[torch.arange(TOKENS), targets]
        assert p_target.median() > 0.9999  # the regime where a bf16 softmax loses the gradient
    fused = _loss_and_grads(_fused, hidden, weight, targets, torch.float32)
    plain = _loss_and_grads(_plain, hidden, weight, targets, torch.float32)
    for what, f, p, r in zip(("loss", "grad_hidden", "grad_weight"), fused, plain, reference):
        fused_err, plain_err = _rel(f, r), _rel(p, r)
        # bf16 matmuls on both paths: the same logit rounding; the fused path may not add error.
        assert fused_err <= 1.25 * plain_err + 1e-6, (what, fused_err, plain_err)
        assert fused_err < 0.03, (what, fused_err)


def test_fp32_fused_loss_equals_the_reference_for_any_logit_gap():
    hidden, weight, targets = _problem("confident")
    weight[targets[0]] *= -40.0  # token 0's target logit is now hundreds of nats below the best
    fused = _loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk=40), hidden, weight, targets,
                            torch.float32)
    reference = _loss_and_grads(_reference, hidden, weight, targets, torch.float64)
    per_token = F.cross_entropy(hidden.double() @ weight.double().t(), targets, reduction="none")
    assert per_token[0] > 200  # -log(clamp(p)) would count ~87 here
    for f, r in zip(fused, reference):
        assert _rel(f, r) < 1e-5


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_fused_loss_does_no_gradient_work_without_grad_mode():
    hidden, weight, targets = _problem("flat")
    hidden.requires_grad_()
    weight.requires_grad_()
    chunks = -(-TOKENS // 40)
    with torch.no_grad(), _CountMatmuls() as counter:
        evaluated = fused_linear_cross_entropy(hidden, weight, targets, chunk=40)
    assert counter.count == chunks  # the logits only
    with _CountMatmuls() as counter:
        trained = fused_linear_cross_entropy(hidden, weight, targets, chunk=40)
    assert counter.count == 3 * chunks  # logits, grad_hidden, grad_weight
    assert torch.equal(evaluated, trained.detach())

"""The fused losses on one device (cross-entropy and distillation) against references: fp64,
``F.cross_entropy`` / ``F.kl_div`` on full logits; targets and ``ignore_index``; the incoming gradient;
the memory of the chunk loop. Under tensor parallelism: test_vocab_parallel_loss.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from argonne_dt.loss import (IGNORE_INDEX, batch_on, check_targets, cross_entropy_loss, distillation_loss,
                             fused_linear_cross_entropy, fused_loss_bytes, transposed_weight_copy)
from helpers.loss_problems import (TOKENS, VOCAB, WIDTH, distillation_errors, fused_bf16, fused_fp32,
                                   large_logits_problem, loss_and_grads, loss_peak_bytes, loss_problem,
                                   relative_error)


def _plain(hidden, weight, targets):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return cross_entropy_loss(F.linear(hidden, weight)[None], targets[None])


def _reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets)


@pytest.mark.parametrize("kind", ["confident", "flat"])
def test_bf16_fused_loss_is_at_least_as_accurate_as_the_plain_bf16_path(kind):
    hidden, weight, targets = loss_problem(kind)
    reference = loss_and_grads(_reference, hidden, weight, targets, torch.float64)
    if kind == "confident":
        p_target = torch.softmax(hidden.double() @ weight.double().t(), -1)[torch.arange(TOKENS), targets]
        assert p_target.median() > 0.9999  # the regime where a bf16 softmax loses the gradient
    fused = loss_and_grads(fused_bf16, hidden, weight, targets)
    plain = loss_and_grads(_plain, hidden, weight, targets)
    for what, f, p, r in zip(("loss", "grad_hidden", "grad_weight"), fused, plain, reference):
        fused_err, plain_err = relative_error(f, r), relative_error(p, r)
        # bf16 matmuls on both paths: the same logit rounding; the fused path may not add error.
        assert fused_err <= 1.25 * plain_err + 1e-6, (what, fused_err, plain_err)
        assert fused_err < 0.03, (what, fused_err)


def test_fp32_fused_loss_equals_the_reference_for_any_logit_gap():
    hidden, weight, targets = loss_problem("confident")
    weight[targets[0]] *= -40.0  # token 0's target logit is now hundreds of nats below the best
    fused = loss_and_grads(fused_fp32, hidden, weight, targets)
    reference = loss_and_grads(_reference, hidden, weight, targets, torch.float64)
    per_token = F.cross_entropy(hidden.double() @ weight.double().t(), targets, reduction="none")
    assert per_token[0] > 200  # -log(clamp(p)) would count ~87 here
    for f, r in zip(fused, reference):
        assert relative_error(f, r) < 1e-5


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_fused_loss_does_no_gradient_work_without_grad_mode():
    hidden, weight, targets = loss_problem("flat")
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


# Targets: ignore_index and ids outside the vocabulary, alike on every path.

def _distillation_ce(hidden, weight, targets):
    """The distillation loss's CE term, differentiable (alpha = 1 makes the loss the CE)."""
    teacher = torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(9)) / WIDTH**0.5
    loss, ce, _ = distillation_loss(hidden, weight, hidden.detach(), teacher, targets, alpha=1.0, temperature=2.0,
                                    chunk=40)
    assert torch.equal(loss.detach(), ce)
    return loss


PATHS = {"fused": fused_fp32, "logits": lambda h, w, t: cross_entropy_loss(F.linear(h, w)[None], t[None]),
         "distillation_ce": _distillation_ce}


@pytest.mark.parametrize("path", list(PATHS))
def test_ignore_index_is_left_out_of_the_mean_as_f_cross_entropy_does(path):
    hidden, weight, targets = loss_problem("flat", ignored=True)
    got = loss_and_grads(PATHS[path], hidden, weight, targets)
    reference = loss_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX), hidden,
                                weight, targets, torch.float64)
    for what, g, r in zip(("loss", "grad_hidden", "grad_weight"), got, reference):
        assert relative_error(g, r) < 1e-5, (what, relative_error(g, r))
    assert got[1][::5].abs().max() == 0  # an ignored token gets no gradient


@pytest.mark.parametrize("path", list(PATHS))
def test_a_micro_batch_with_every_target_ignored_has_loss_zero_and_no_gradient(path):
    hidden, weight, targets = loss_problem("flat")
    loss, grad_hidden, grad_weight = loss_and_grads(PATHS[path], hidden, weight, torch.full_like(targets, IGNORE_INDEX))
    assert loss == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("bad", [VOCAB, -1, -101])
def test_a_target_outside_the_vocabulary_is_an_error_that_names_it(path, bad):
    hidden, weight, targets = loss_problem("flat")
    targets[3] = bad
    with pytest.raises(ValueError, match=rf"target ids \[{bad}\] lie outside the vocabulary \[0, {VOCAB}\)"):
        PATHS[path](hidden, weight.requires_grad_(), targets)


def test_targets_are_checked_on_the_host_before_their_copy_and_never_read_from_a_device():
    batch = {"input": torch.zeros(1, 4, dtype=torch.long), "target": torch.tensor([[1, 2, VOCAB, 3]])}
    with pytest.raises(ValueError, match=rf"target ids \[{VOCAB}\]"):
        batch_on(torch.device("cpu"), batch, VOCAB)
    # A device tensor is not read (a meta tensor has no values: reading one raises).
    check_targets(torch.full((4,), VOCAB, device="meta"), VOCAB)


@pytest.mark.parametrize("path", ["fused", "distillation_ce"])
def test_fused_backward_scales_by_the_incoming_gradient(path):
    hidden, weight, targets = loss_problem("flat")
    _, *whole = loss_and_grads(PATHS[path], hidden, weight, targets)
    _, *half = loss_and_grads(PATHS[path], hidden, weight, targets, scale=0.5)
    for w, h in zip(whole, half):
        assert torch.allclose(h, 0.5 * w, rtol=1e-6, atol=0), relative_error(h, 0.5 * w)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_at_logits_of_200_equals_fp64_kl_div(temperature):
    problem = large_logits_problem()
    logits = problem[0] @ problem[1].t()
    assert 150 < logits.abs().max() < 400  # exp() of these overflows fp32 without the max-shift
    errors = distillation_errors(problem, alpha=0.3, temperature=temperature)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [40, 1024])
def test_fused_loss_bytes_is_what_the_loop_allocates(dtype, chunk):
    hidden, weight, targets = loss_problem("flat")
    measured, largest = loss_peak_bytes(hidden, weight, targets, chunk, dtype)
    predicted = fused_loss_bytes(TOKENS, chunk, VOCAB, WIDTH, dtype, transposed_weight_copy(torch.device("cpu"), dtype))
    assert 0 <= measured - predicted <= 16, (measured, predicted)  # a scalar or two
    if chunk < TOKENS:  # no tensor holds all the tokens' logits
        assert largest < TOKENS * VOCAB * 4

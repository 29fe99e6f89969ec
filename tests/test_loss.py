"""The fused losses (cross-entropy at TP 1 and vocab-parallel, distillation) against references:
fp64, ``F.cross_entropy`` / ``F.kl_div`` on full logits, and ``loss_parallel()`` on sharded logits;
targets and ``ignore_index``; the incoming gradient; the memory of the chunk loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from argonne_dt.distributed import full_value
from argonne_dt.loss import (IGNORE_INDEX, batch_on, check_targets, cross_entropy_loss, distillation_loss,
                             fused_linear_cross_entropy, fused_loss_bytes, transposed_weight_copy)
from helpers.comparisons import MODEL, SEQ, case_layout, max_relative_error, unwrapped_name
from helpers.loss_problems import (TOKENS, VOCAB, WIDTH, distillation_errors, fused_bf16, fused_fp32,
                                   large_logits_problem, loss_and_grads, loss_peak_bytes, loss_problem,
                                   relative_error)
from helpers.models import odd_model_config
from helpers.processes import run_distributed


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


# Tensor parallel: one spawn of 4 gloo ranks, dp 2 x tp 2; the loss-level cases run on the tp pairs.

MODEL_CASES = {"tp2": ((2, 2), dict(tp=2)), "dp2_tp2": ((2, 2), dict(tp=2, dp=2))}
UNEVEN_VOCAB = 1001  # 501 + 500 rows over 2 ranks


def _sharded(tp_mesh):
    """A weight's vocab-sharded DTensor over ``tp_mesh``, differentiable: the gradient comes back whole."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return lambda weight: DTensor.from_local(weight, tp_mesh, [Replicate()], run_check=False).redistribute(
        placements=[Shard(0)])


def _vocab_parallel(tp_mesh, autocast: bool = False):
    """The vocab-parallel fused loss of a weight sharded over ``tp_mesh``."""
    def loss_fn(hidden, weight, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return fused_linear_cross_entropy(hidden, _sharded(tp_mesh)(weight), targets, chunk=40)

    return loss_fn


def _loss_parallel_today(tp_mesh):
    """The loss under tensor parallelism before the fused one: the full logits sharded over the
    vocabulary, then ``F.cross_entropy`` under ``loss_parallel()`` (forward and backward inside it)."""
    from torch.distributed.tensor import DTensor, Replicate

    def loss_fn(hidden, weight, targets):
        rows = DTensor.from_local(hidden, tp_mesh, [Replicate()], run_check=False)
        logits = rows @ _sharded(tp_mesh)(weight).t()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).full_tensor()

    return loss_fn


def _loss_cases(tp_mesh) -> dict:
    from torch.distributed.tensor.parallel import loss_parallel

    out = {}
    for kind in ("flat", "confident"):
        problem = loss_problem(kind, vocab=UNEVEN_VOCAB, ignored=True)
        reference = loss_and_grads(_reference_ignoring, *problem, torch.float64)
        fp32 = loss_and_grads(_vocab_parallel(tp_mesh), *problem)
        runs = {"fp32": fp32, "tp1_fp32": loss_and_grads(fused_fp32, *problem),
                "loss_parallel": loss_and_grads(_loss_parallel_today(tp_mesh), *problem, context=loss_parallel),
                "bf16": loss_and_grads(_vocab_parallel(tp_mesh, autocast=True), *problem),
                "tp1_bf16": loss_and_grads(fused_bf16, *problem)}
        # Errors against fp64 of (loss, grad_hidden, grad_weight).
        out[kind] = {name: [relative_error(a, b) for a, b in zip(run, reference)] for name, run in runs.items()}
        half = loss_and_grads(_vocab_parallel(tp_mesh), *problem, scale=0.5)
        out[kind]["half"] = [relative_error(h, 0.5 * w) for h, w in zip(half[1:], fp32[1:])]
    hidden, weight, targets = loss_problem("flat", vocab=UNEVEN_VOCAB)
    out["all_ignored"] = [x.abs().max().item() for x in
                          loss_and_grads(_vocab_parallel(tp_mesh), hidden, weight, torch.full_like(targets, -100))]
    targets[7] = UNEVEN_VOCAB
    try:
        _vocab_parallel(tp_mesh)(hidden, weight, targets)
    except ValueError as err:
        out["out_of_range"] = str(err)
    out["distillation"] = {t: distillation_errors(large_logits_problem(UNEVEN_VOCAB), 0.3, t, _sharded(tp_mesh))
                           for t in (1.0, 2.0)}
    # Memory: the shard's loss, three chunks of it, against the bytes the planner is given.
    from torch.distributed.tensor import Shard, distribute_tensor

    sharded = distribute_tensor(weight, tp_mesh, [Shard(0)])
    shard_rows = sharded.to_local().shape[0]
    targets = torch.randint(0, UNEVEN_VOCAB, (TOKENS,))
    # The second run: a first one may also hold what DTensor's sharding propagation makes the first
    # time it meets an operator (as the planner measures).
    loss_peak_bytes(hidden, sharded, targets, 40, torch.float32)
    measured, largest = loss_peak_bytes(hidden, sharded, targets, 40, torch.float32)
    out["memory"] = {"measured": measured, "largest": largest, "shard_rows": shard_rows,
                     "predicted": fused_loss_bytes(TOKENS, 40, shard_rows, WIDTH, torch.float32)}
    return out


def _reference_ignoring(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)


def _model_case(shape, parallel_kwargs) -> dict:
    """The parallelized model's own loss path (the fused vocab-parallel loss, the default) against one
    device's full logits and F.cross_entropy: the loss and every gradient, fp32."""
    from argonne_dt.config import ParallelConfig
    from argonne_dt.model import ArgonneModel
    from argonne_dt.parallelize import parallelize

    layout = case_layout(shape, ParallelConfig(**parallel_kwargs))
    torch.manual_seed(0)
    reference = ArgonneModel(odd_model_config(**MODEL))
    model = parallelize(copy.deepcopy(reference), layout)
    model.use_loss_path(fused_chunk=24)  # chunks cut rows
    tokens = torch.randint(0, MODEL["vocab_size"], (4, SEQ + 1), generator=torch.Generator().manual_seed(1))
    local = tokens.chunk(layout.dp)[layout.dp_rank]
    F.cross_entropy(reference(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    with torch.no_grad():
        expected = F.cross_entropy(reference(local[:, :-1]).flatten(0, 1), local[:, 1:].flatten()).item()
    loss = model(local[:, :-1], targets=local[:, 1:])
    loss.backward()
    ref_params = dict(reference.named_parameters())
    return {"loss_error": abs(loss.item() - expected) / expected, "plain_loss": not hasattr(loss, "placements"),
            "grad_errors": {unwrapped_name(n): max_relative_error(full_value(p.grad),
                                                                  ref_params[unwrapped_name(n)].grad)
                            for n, p in model.named_parameters()}}


def _all_cases() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    results = {"loss": _loss_cases(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"])}
    results.update({name: _model_case(shape, kwargs) for name, (shape, kwargs) in MODEL_CASES.items()})
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(_all_cases, 4)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["flat", "confident"])
def test_vocab_parallel_loss_equals_one_device_and_loss_parallel_on_an_uneven_vocabulary(per_rank, kind):
    for rank, results in enumerate(per_rank):
        r = results["loss"][kind]
        for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
            # fp32: within 1e-5, or (confident data: p(target) - 1 cancels in fp32 on every path) within
            # the error of one device's fused loss and of loss_parallel() on full logits.
            assert r["fp32"][i] <= max(1e-5, 1.25 * r["tp1_fp32"][i]), (rank, what, r)
            assert r["fp32"][i] <= max(1e-5, 1.25 * r["loss_parallel"][i]), (rank, what, r)
            assert r["bf16"][i] <= 1.25 * r["tp1_bf16"][i] + 1e-6, (rank, what, r)  # bf16: no error beyond TP 1's


@pytest.mark.distributed
def test_vocab_parallel_backward_scales_by_the_incoming_gradient(per_rank):
    for results in per_rank:
        for kind in ("flat", "confident"):
            assert max(results["loss"][kind]["half"]) < 1e-6, results["loss"][kind]["half"]


@pytest.mark.distributed
def test_vocab_parallel_targets_behave_as_at_tp1(per_rank):
    for results in per_rank:
        assert results["loss"]["all_ignored"] == [0.0, 0.0, 0.0]
        assert f"target ids [{UNEVEN_VOCAB}] lie outside the vocabulary [0, {UNEVEN_VOCAB})" in results["loss"]["out_of_range"]


@pytest.mark.distributed
def test_vocab_parallel_distillation_at_logits_of_200_equals_fp64_kl_div(per_rank):
    for results in per_rank:
        for temperature, errors in results["loss"]["distillation"].items():
            assert max(errors.values()) < 1e-5, (temperature, errors)


@pytest.mark.distributed
def test_vocab_parallel_loss_holds_one_chunk_of_the_shard_as_the_planner_counts(per_rank):
    for results in per_rank:
        memory = results["loss"]["memory"]
        assert 0 <= memory["measured"] - memory["predicted"] <= 16, memory
        assert memory["largest"] < TOKENS * memory["shard_rows"] * 4  # never the micro-batch's logits


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_tensor_parallel_model_loss_and_every_gradient_equal_one_device(per_rank, case):
    for rank, results in enumerate(per_rank):
        r = results[case]
        assert r["plain_loss"] and r["loss_error"] < 1e-5, (rank, r["loss_error"])
        worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, worst)

"""Next-token losses: plain cross-entropy on logits, and the fused chunked lm_head + cross-entropy.

Numerics (both paths): the loss of a token is ``logsumexp(logits) - logits[target]``, exact for
any logit gap (``-log(p)`` saturates at ~87 nats in fp32); the softmax, the (softmax - one_hot)
gradient and every accumulation are fp32. Only the matmuls run in the autocast dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel

from .distributed import full_value


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32; works on vocab-sharded DTensor logits under ``loss_parallel()``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def _chunked_loss(hidden, weight, targets, chunk: int, want_grads: bool):
    """Summed loss over all tokens and, with ``want_grads``, the gradients of the *mean* loss.

    Per chunk of tokens: logits = h @ W.T in the compute dtype, upcast to fp32; shifted by their
    maximum, they give the loss exactly; their softmax minus the one-hot (fp32) is d(loss)/d(logits). The
    two gradient matmuls take that fp32 difference cast to the compute dtype (a relative
    rounding, not the cancellation of a bf16 probability near 1), and grad_weight is summed over
    chunks in fp32.
    """
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    scale = 1.0 / hidden.shape[0]
    w = weight.to(compute)
    # grad_hidden = d_logits @ w reduces over the vocabulary. CPU gemm kernels without native
    # bf16 are an order of magnitude slower when that dimension is not the contiguous one of
    # both operands (seen: 19 s vs 1.1 s for 128 tokens of tiny); one transposed copy avoids it.
    w_for_grad = w.t().contiguous().t() if want_grads and device == "cpu" else w
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    grad_weight = None
    with torch.autocast(device, enabled=False):
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(compute)
            t = targets[start : start + chunk]
            rows = torch.arange(len(t), device=t.device)
            # One fp32 buffer per chunk, worked in place: shifted logits, then exp, then softmax.
            shifted = (h @ w.t()).float()
            shifted -= shifted.amax(dim=-1, keepdim=True)
            target_shifted = shifted[rows, t]
            sums = shifted.exp_().sum(dim=-1)
            loss += (sums.log() - target_shifted).sum()  # logsumexp - logit[target], exact for any gap
            if not want_grads:
                continue
            d_logits = shifted.div_(sums[:, None])
            d_logits[rows, t] -= 1.0
            d_logits = d_logits.to(compute)
            grad_hidden[start : start + chunk] = (d_logits @ w_for_grad).mul_(scale)
            part = d_logits.t() @ h
            # fp32 sum over chunks (the first chunk's part becomes the accumulator: no zeros buffer)
            grad_weight = part.float() if grad_weight is None else grad_weight.add_(part)
    if want_grads:
        grad_weight.mul_(scale)
    return loss, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The forward pass forms the gradients too (the chunk's logits live only inside the loop);
    backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        loss, grad_hidden, grad_weight = _chunked_loss(hidden, weight, targets, chunk, want_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: the buffers serve this one backward pass (no retain_graph double backward).
        return grad_hidden.mul_(grad_output), grad_weight.mul_(grad_output), None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """``cross_entropy_loss(hidden @ weight.T, targets)`` without the full (tokens x vocab) logits.

    Without grad mode (evaluation) or without inputs that need gradients, only the loss is
    computed: no gradient matmuls, no gradient buffers.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
    loss, _, _ = _chunked_loss(hidden, weight, targets, chunk, want_grads=False)
    return loss / hidden.shape[0]


def loss_context(model):
    """``loss_parallel()`` when the model's logits come out vocab-sharded (``ArgonneModel.use_loss_path``);
    the loss's forward and backward go inside it. Other models (Hugging Face's, in the benchmarks)
    have whole logits."""
    return loss_parallel() if getattr(model, "vocab_sharded_logits", False) else contextlib.nullcontext()


def next_token_loss(model, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The pretraining objective: ``{"loss": mean next-token cross-entropy}`` of one micro-batch.

    An objective maps (model, micro-batch) to named scalars; ``loss`` is the one minimized, and
    every other entry is averaged and logged like it. Call it inside ``loss_context(model)``.
    """
    return {"loss": model(batch["input"].to(device), targets=batch["target"].to(device))}


def _token_rows(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(tokens, width) rows of final hidden states, laid out to multiply ``weight``: replicated over
    its mesh when the weight is vocab-sharded (the all-gather ColwiseParallel does for the lm_head)."""
    if isinstance(weight, DTensor):
        if isinstance(hidden, DTensor):
            hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim)
        else:
            hidden = DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)
    return hidden.flatten(0, 1)


def _vocab_ids(weight: torch.Tensor) -> torch.Tensor:
    """The vocabulary ids of ``weight``'s rows, laid out like its rows (the one-hot of the targets)."""
    if not isinstance(weight, DTensor):
        return torch.arange(weight.shape[0], device=weight.device)
    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    ids = torch.arange(offset[0], offset[0] + local_shape[0], device=weight.device)
    return DTensor.from_local(ids, weight.device_mesh, [Shard(0)], run_check=False, shape=weight.shape[:1],
                              stride=(1,))


def _like_rows(targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(weight, DTensor):
        return DTensor.from_local(targets, weight.device_mesh, [Replicate()], run_check=False)
    return targets


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, vocab-sharded or not, by DTensor reductions (max, sum). Under
    ``loss_parallel`` the built-in one has a backward only for what ``nll_loss`` sends it, not for
    a dense gradient such as the KL's."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _distillation_chunks(student_rows, student_weight, teacher_rows, teacher_weight, targets, alpha: float,
                         temperature: float, chunk: int, teacher_precision, want_grads: bool):
    """Summed CE and KL over all tokens and, with ``want_grads``, the gradients of the loss
    ``alpha * CE + (1 - alpha) * T^2 * KL`` (means over tokens) for the student's rows and weight.

    Per chunk: both models' logits (the matmuls in the compute dtype, then fp32); the student's
    log-softmax at T = 1 (CE) and at T, the teacher's at T; d(loss)/d(logits) = alpha (p - onehot)
    + (1 - alpha) T (p_T - q_T), in fp32, cast to the compute dtype for the two gradient matmuls;
    grad_weight summed over chunks in fp32. Vocab-sharded DTensors give sharded logits, and the
    reductions over the vocabulary are DTensor reductions.
    """
    device = student_rows.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else student_weight.dtype
    tokens = student_rows.shape[0]
    w = student_weight.to(compute)
    w_for_grad = w.t().contiguous().t() if want_grads and device == "cpu" else w  # see _chunked_loss
    vocab, targets = _vocab_ids(student_weight), _like_rows(targets, student_weight)
    ce_sum = kl_sum = torch.zeros((), dtype=torch.float32, device=student_rows.device)
    grad_rows, grad_weight = [], None
    for start in range(0, tokens, chunk):
        with teacher_precision():
            teacher = F.linear(teacher_rows[start : start + chunk], teacher_weight).float()
        with torch.autocast(device, enabled=False):
            h = student_rows[start : start + chunk].to(compute)
            logits = (h @ w.t()).float()
            teacher = _log_softmax(teacher / temperature)
            log_p = _log_softmax(logits)
            onehot = vocab[None, :] == targets[start : start + chunk, None]
            ce_sum = ce_sum + full_value(-(log_p * onehot).sum())
            log_p_t = log_p if temperature == 1.0 else _log_softmax(logits / temperature)
            del logits
            q = teacher.exp()
            kl_sum = kl_sum + full_value((q * (teacher - log_p_t)).sum())
            del teacher
            if not want_grads:
                continue
            # d(loss)/d(logits) = alpha (p - onehot) + (1 - alpha) T (p_T - q), built in place.
            d_logits = log_p_t.exp().sub_(q).mul_((1.0 - alpha) * temperature)
            del q, log_p_t
            d_logits.add_(log_p.exp(), alpha=alpha).sub_(onehot.to(d_logits.dtype), alpha=alpha)
            del log_p
            d_logits = d_logits.div_(tokens).to(compute)
            part = d_logits @ w_for_grad
            grad_rows.append(part.redistribute(placements=[Replicate()]) if isinstance(part, DTensor) else part)
            part = (d_logits.t() @ h).float()
            grad_weight = part if grad_weight is None else grad_weight + part
    return ce_sum, kl_sum, (torch.cat(grad_rows) if want_grads else None), grad_weight


class _FusedDistillation(torch.autograd.Function):
    """The forward pass forms the gradients too: the chunk's logits of both models live only inside
    the loop and nothing is recomputed; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, student_rows, student_weight, teacher_rows, teacher_weight, targets, alpha, temperature, chunk,
                teacher_precision):
        ce_sum, kl_sum, grad_rows, grad_weight = _distillation_chunks(
            student_rows, student_weight, teacher_rows, teacher_weight, targets, alpha, temperature, chunk,
            teacher_precision, want_grads=True)
        ctx.save_for_backward(grad_rows.to(student_rows.dtype), grad_weight.to(student_weight.dtype))
        tokens = student_rows.shape[0]
        ce, kl = ce_sum / tokens, kl_sum / tokens
        ctx.mark_non_differentiable(ce, kl)
        return alpha * ce + (1.0 - alpha) * temperature**2 * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        grad_rows, grad_weight = ctx.saved_tensors
        with implicit_replication():  # the incoming gradient is a plain scalar; the saved ones may be DTensors
            return grad_rows * grad_loss, grad_weight * grad_loss, None, None, None, None, None, None, None


def distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float,
                      chunk: int = 1024, teacher_precision=contextlib.nullcontext):
    """(loss, CE, KL): ``alpha * CE + (1 - alpha) * T^2 * KL(p_teacher || p_student)``, each a mean over
    tokens, both KL distributions at ``temperature``.

    The logits of both models are formed ``chunk`` tokens at a time from the final hidden states
    and lm_head weights (vocab-sharded DTensors under tensor parallelism), and the forward pass
    also forms the student's gradients: no full-vocabulary logits of the micro-batch exist at
    once, and no logits are recomputed. The two models must share the vocabulary (a larger
    teacher's is cut to the student's). ``teacher_precision()`` is the autocast context of the
    teacher's matmuls. Without grad mode nothing but the values is computed.
    """
    student_rows = _token_rows(student_hidden, student_weight)
    teacher_rows = _token_rows(teacher_hidden, teacher_weight)
    targets = targets.flatten()
    if torch.is_grad_enabled() and (student_rows.requires_grad or student_weight.requires_grad):
        return _FusedDistillation.apply(student_rows, student_weight, teacher_rows, teacher_weight, targets, alpha,
                                        temperature, chunk, teacher_precision)
    ce_sum, kl_sum, _, _ = _distillation_chunks(student_rows, student_weight, teacher_rows, teacher_weight, targets,
                                                alpha, temperature, chunk, teacher_precision, want_grads=False)
    tokens = student_rows.shape[0]
    ce, kl = ce_sum / tokens, kl_sum / tokens
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl, ce, kl

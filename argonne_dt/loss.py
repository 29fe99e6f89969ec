"""Next-token losses: plain cross-entropy on logits, and the fused chunked lm_head + cross-entropy.

Numerics (both paths): the loss of a token is ``logsumexp(logits) - logits[target]``, exact for
any logit gap (``-log(p)`` saturates at ~87 nats in fp32); the softmax, the (softmax - one_hot)
gradient and every accumulation are fp32. Only the matmuls run in the autocast dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.checkpoint import checkpoint

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


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, vocab-sharded or not, by DTensor reductions (max, sum). Under
    ``loss_parallel`` the built-in one has a backward only for what ``nll_loss`` sends it, not for
    a dense gradient such as the KL's."""
    shifted = logits - logits.detach().amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _chunk_kl_sum(student_rows, student_weight, teacher_rows, teacher_weight, temperature: float,
                  teacher_precision) -> torch.Tensor:
    """Sum over the chunk's tokens of KL(p_teacher || p_student) at ``temperature``, fp32 softmax math."""
    with torch.no_grad(), teacher_precision():
        teacher = _log_softmax(F.linear(teacher_rows, teacher_weight).float() / temperature)
    student = _log_softmax(F.linear(student_rows, student_weight).float() / temperature)
    return full_value((teacher.exp() * (teacher - student)).sum())


def distillation_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, temperature: float, chunk: int = 1024,
                    teacher_precision=contextlib.nullcontext) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), both softmaxes at ``temperature``.

    The logits of both models are formed ``chunk`` tokens at a time from the final hidden states
    and lm_head weights (vocab-sharded DTensors under tensor parallelism: the softmaxes then run
    under ``loss_parallel``, which the caller's ``loss_context`` provides), and each chunk is
    recomputed in backward instead of kept: no full-vocabulary logits of the micro-batch exist at
    once. The two models must share the vocabulary (a larger teacher's is cut to the student's).
    ``teacher_precision()`` is the autocast context of the teacher's matmuls.
    """
    student_rows = _token_rows(student_hidden, student_weight)
    teacher_rows = _token_rows(teacher_hidden, teacher_weight)
    tokens = student_rows.shape[0]
    total = None
    for start in range(0, tokens, chunk):
        part = checkpoint(_chunk_kl_sum, student_rows[start : start + chunk], student_weight,
                          teacher_rows[start : start + chunk], teacher_weight, temperature, teacher_precision,
                          use_reentrant=False)
        total = part if total is None else total + part
    return total / tokens

"""Next-token losses: one chunk loop for every fused loss (cross-entropy at any tensor-parallel
degree, and distillation), and plain cross-entropy on logits.

Numerics (every path): the loss of a token is ``logsumexp(logits) - logits[target]``, exact for any
logit gap (``-log(p)`` saturates at ~87 nats in fp32); the softmax, the gradient of the logits and
every accumulation are fp32. Only the matmuls run in the autocast dtype.

Targets, as ``F.cross_entropy`` has them: ``IGNORE_INDEX`` (-100) marks a token without a target; it
is left out of the numerator and the denominator of the mean (and of the distillation's KL) and gets
no gradient. Unlike ``F.cross_entropy`` (nan), a micro-batch whose every token is ignored has loss 0
and no gradient. Each micro-batch's loss is the mean over its own counted tokens, and accumulation
(``step.accumulate_gradients``) and data parallelism weigh micro-batches equally. Any other id
outside ``[0, vocab)`` is an error where the targets are on the host: the objectives check each
micro-batch there before its copy to the device (``batch_on``), and a loss called with CPU targets
checks them; targets already on a GPU are not checked (``check_targets`` would make the host wait for
the device once per micro-batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import loss_parallel

from .distributed import native_bf16
from .metrics import local_tensor

IGNORE_INDEX = -100


def check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Refuse target ids outside ``[0, vocab_size)`` other than ``IGNORE_INDEX``: a fused or
    vocab-parallel loss would otherwise read another token's logit, or none, without a word.

    Only host tensors are read: reading a GPU tensor would make the host wait for the device once
    per micro-batch. Training batches are checked on the host before their copy (``batch_on``)."""
    if targets.device.type != "cpu":
        return
    outside = (targets >= vocab_size) | ((targets < 0) & (targets != IGNORE_INDEX))
    if outside.any():
        ids = sorted(set(targets[outside].tolist()))
        raise ValueError(f"target ids {ids[:5]} lie outside the vocabulary [0, {vocab_size}) "
                         f"(model.vocab_size={vocab_size}); only {IGNORE_INDEX} (ignore_index) may: does the "
                         "tokenizer (data.tokenizer) match the model's vocabulary?")


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 over the counted targets; works on vocab-sharded DTensor logits
    under ``loss_parallel()``."""
    targets = targets.flatten(0, 1)
    check_targets(targets, logits.shape[-1])
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)


@dataclass(frozen=True)
class _VocabShard:
    """The vocabulary rows of an lm_head weight held on this rank, and reductions over the ranks that
    hold the others (DTensor reductions of per-shard values; none for a whole vocabulary)."""

    offset: int
    size: int
    mesh: DeviceMesh | None = None
    placements: tuple[Placement, ...] = ()

    @classmethod
    def of(cls, weight: torch.Tensor) -> _VocabShard:
        if not isinstance(weight, DTensor):
            return cls(0, weight.shape[0])
        shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
        return cls(offset[0], shape[0], weight.device_mesh, tuple(weight.placements))

    def partial(self, op: str = "sum") -> list[Placement]:
        """Per-shard values to be combined over the vocabulary's mesh dimension(s)."""
        return [Partial(op) if isinstance(p, Shard) else Replicate() for p in self.placements]

    def reduce(self, local: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The sum (or max) over the vocabulary shards of each shard's ``local`` values."""
        if self.mesh is None:
            return local
        return DTensor.from_local(local, self.mesh, self.partial(op), run_check=False).full_tensor()

    def targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token: the target's column in this shard (clamped), whether this shard holds it (no
        shard holds an ignored one), and its weight in the mean (1 / counted tokens, 0 if ignored)."""
        local = targets - self.offset
        held = (local >= 0) & (local < self.size) & (targets != IGNORE_INDEX)
        counted = targets != IGNORE_INDEX
        weight = counted / counted.sum().clamp_min(1)
        return local.clamp(0, self.size - 1)[:, None], held, weight


def transposed_weight_copy(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether the fused loss keeps a transposed copy of the weight for grad_rows = d_logits @ w,
    which reduces over the vocabulary: CPU bf16 gemm without native bf16 is an order of magnitude
    slower when that dimension is not the contiguous one of both operands (seen: 19 s vs 1.1 s for
    128 tokens of tiny). Elsewhere (GPUs, native bf16, fp32) the layout costs nothing."""
    return device.type == "cpu" and compute_dtype == torch.bfloat16 and not native_bf16(device)


# Set by ``weight_layout_as``: the device whose layout choice the fused loss makes (None: its own).
_layout_device: ContextVar[torch.device | None] = ContextVar("layout_device", default=None)


@contextlib.contextmanager
def weight_layout_as(device: torch.device):
    """The fused loss here chooses its weight layout (``transposed_weight_copy``) as it would on
    ``device``: the planner measures a GPU's loss on this CPU, where that choice depends on the host."""
    token = _layout_device.set(torch.device(device))
    try:
        yield
    finally:
        _layout_device.reset(token)


def _compute_dtype(device: str, weight: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


# A chunk's loss: (token span, the chunk's fp32 logits of the local vocabulary shard, which it may
# overwrite) -> (the chunk's term sums, loss first; d(loss)/d(logits) in fp32, or None without gradients).
ChunkLoss = Callable[[slice, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _chunk_loop(rows: torch.Tensor, weight: torch.Tensor, chunk: int, want_grads: bool, chunk_loss: ChunkLoss):
    """The one loop of every fused loss, on local tensors: ``rows`` (tokens, width) replicated over the
    vocabulary's ranks, ``weight`` this rank's vocabulary rows.

    Per chunk of tokens: logits = rows @ weight.T in the compute dtype, upcast to fp32, handed to
    ``chunk_loss``; its fp32 d(loss)/d(logits) is cast to the compute dtype (a relative rounding, not
    the cancellation of a bf16 probability near 1) for the two gradient matmuls, and grad_weight is
    summed over chunks in fp32. Returns the summed terms, grad_rows (this shard's part of the sum
    over the vocabulary) and grad_weight.
    """
    device = rows.device.type
    compute = _compute_dtype(device, weight)
    w = weight.to(compute)
    w_for_grad = w.t().contiguous().t() if want_grads and transposed_weight_copy(_layout_device.get() or rows.device, compute) else w
    totals = grad_weight = None
    grad_rows = torch.empty_like(rows) if want_grads else None
    with torch.autocast(device, enabled=False):
        for start in range(0, rows.shape[0], chunk):
            span = slice(start, start + chunk)
            h = rows[span].to(compute)
            terms, d_logits = chunk_loss(span, (h @ w.t()).float())
            totals = terms if totals is None else totals.add_(terms)
            if not want_grads:
                continue
            d_logits = d_logits.to(compute)
            grad_rows[span] = d_logits @ w_for_grad
            # fp32 sum over chunks (the first chunk's part becomes the accumulator: no zeros buffer)
            if grad_weight is None:
                grad_weight = (d_logits.t() @ h).float()
            elif compute == torch.float32:
                grad_weight.addmm_(d_logits.t(), h)
            else:
                grad_weight.add_(d_logits.t() @ h)
            del d_logits  # before the next chunk's logits: one chunk's buffers at a time
    return totals, grad_rows, grad_weight


class _FusedLoss(torch.autograd.Function):
    """The forward pass forms the gradients too (a chunk's logits live only inside the loop, nothing
    is recomputed); backward scales them by the incoming gradient of the loss (the first term)."""

    @staticmethod
    def forward(ctx, rows, weight, chunk_loss, chunk):
        terms, grad_rows, grad_weight = _chunk_loop(local_tensor(rows), local_tensor(weight), chunk, True, chunk_loss)
        ctx.save_for_backward(grad_rows, grad_weight.to(weight.dtype))
        ctx.rows, ctx.weight = _layout_of(rows), _layout_of(weight)
        ctx.vocab_partial = _VocabShard.of(weight).partial()
        return terms

    @staticmethod
    def backward(ctx, grad_terms):
        grad_rows, grad_weight = ctx.saved_tensors
        scale = grad_terms[0]
        # In place: the buffers serve this one backward pass (no retain_graph double backward).
        # grad_rows holds this shard's part of a sum over the vocabulary: Partial, which the
        # all-gather of the hidden states turns into a reduce-scatter in its backward.
        return ctx.rows(grad_rows.mul_(scale), ctx.vocab_partial), ctx.weight(grad_weight.mul_(scale)), None, None


def _layout_of(tensor: torch.Tensor):
    """Rewraps a local gradient the way ``tensor`` is laid out (a DTensor, or plain)."""
    if not isinstance(tensor, DTensor):
        return lambda local, placements=None: local
    mesh, own, shape, stride = tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride()

    def wrap(local, placements=None):
        """``placements``: others than ``tensor``'s (a Partial sum over the vocabulary's mesh dims)."""
        return DTensor.from_local(local, mesh, placements or own, run_check=False, shape=shape, stride=stride)

    return wrap


def _token_rows(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(tokens, width) rows of final hidden states, laid out to multiply ``weight``: replicated over
    its mesh when the weight is vocab-sharded (the all-gather ColwiseParallel does for the lm_head)."""
    if isinstance(weight, DTensor):
        if isinstance(hidden, DTensor):
            hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim)
        else:
            hidden = DTensor.from_local(hidden, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim,
                                        run_check=False)
    return hidden.flatten(0, -2)


def _fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, make_chunk_loss):
    """The summed terms of ``make_chunk_loss(rows, vocab, targets, want_grads)`` over chunks of tokens,
    through the autograd function when gradients are wanted (else values only: no gradient work)."""
    rows, targets = _token_rows(hidden, weight), targets.flatten()
    check_targets(targets, weight.shape[0])
    want_grads = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    chunk_loss = make_chunk_loss(_VocabShard.of(weight), targets, want_grads)
    if want_grads:
        return _FusedLoss.apply(rows, weight, chunk_loss, chunk)
    return _chunk_loop(local_tensor(rows), local_tensor(weight), chunk, False, chunk_loss)[0]


def _cross_entropy_chunks(vocab: _VocabShard, targets: torch.Tensor, want_grads: bool) -> ChunkLoss:
    column, held, token_weight = vocab.targets(targets)

    def chunk_loss(span, logits):
        # One fp32 buffer, worked in place: shifted logits, then exp, then the softmax's gradient.
        logits -= vocab.reduce(logits.amax(dim=-1), "max")[:, None]
        target = logits.gather(1, column[span]).squeeze(1) * held[span]
        sums, target = vocab.reduce(torch.stack((logits.exp_().sum(dim=-1), target)))
        weight = token_weight[span]
        loss = ((sums.log() - target) * weight).sum()  # logsumexp - logit[target], exact for any gap
        if not want_grads:
            return loss[None], None
        # d(mean loss)/d(logits) = (softmax - one_hot) / counted tokens
        d_logits = logits.mul_((weight / sums)[:, None])
        return loss[None], d_logits.scatter_add_(1, column[span], -(weight * held[span])[:, None])

    return chunk_loss


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """``cross_entropy_loss(hidden @ weight.T, targets)`` without the (tokens x vocab) logits: ``chunk``
    tokens at a time. A vocab-sharded DTensor ``weight`` (tensor parallelism) gives the vocab-parallel
    loss: each rank forms its shard's logits from the replicated hidden states, the max and the sum
    of exponentials are reduced over the shards, and the target's logit comes from the shard holding
    it. Without grad mode (evaluation) only the loss is computed.
    """
    return _fused(hidden, weight, targets, chunk, _cross_entropy_chunks)[0]


def loss_context(layout):
    """``loss_parallel()`` when a model parallelized over ``layout`` (a ``ParallelLayout``, None for one
    device) has vocab-sharded logits, for a loss on its logits; the loss's forward and backward go
    inside it. The fused losses need no context."""
    return loss_parallel() if layout is not None and layout.loss_parallel else contextlib.nullcontext()


def next_token_loss(model, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The pretraining objective: ``{"loss": mean next-token cross-entropy}`` of one micro-batch.

    An objective maps (model, micro-batch) to named scalars; ``loss`` is the one minimized, and
    every other entry is averaged and logged like it. Call it inside ``loss_context(layout)``.
    """
    inputs, targets = batch_on(device, batch, model.config.vocab_size)
    return {"loss": model(inputs, targets=targets)}


def batch_on(device: torch.device, batch: dict, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a host micro-batch on ``device``: the targets checked on the host, then
    both copied without blocking (the collated batch is page-locked where a GPU is)."""
    check_targets(batch["target"], vocab_size)
    return batch["input"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)


def _distillation_chunks(teacher_rows, teacher_weight, alpha: float, temperature: float, teacher_precision):
    """Per chunk, from both models' shard logits (the teacher's matmul under ``teacher_precision``):
    the student's softmax at T = 1 (CE) and at T, the teacher's at T (q), reduced over the shards, and
    d(loss)/d(logits) = alpha (p - onehot) + (1 - alpha) T (p_T - q), each row weighted in the mean."""
    teacher_rows, teacher_weight = local_tensor(teacher_rows), local_tensor(teacher_weight)
    kl_weight, t = (1.0 - alpha) * temperature**2, temperature

    def make(vocab: _VocabShard, targets: torch.Tensor, want_grads: bool) -> ChunkLoss:
        column, held, token_weight = vocab.targets(targets)

        def chunk_loss(span, logits):
            with teacher_precision():
                teacher = F.linear(teacher_rows[span], teacher_weight).float()
            maxima = vocab.reduce(torch.stack((logits.amax(dim=-1), teacher.amax(dim=-1))), "max")
            logits -= maxima[0, :, None]
            teacher = teacher.sub_(maxima[1, :, None]).div_(t)  # the teacher's log q + log of its sum
            target = logits.gather(1, column[span]).squeeze(1) * held[span]
            q = teacher.exp()
            # KL = sum q (log q - log p_T) = sum(q (teacher - logits / T)) / sum q - log sum q + log sum p_T
            cross = (q[:, None, :] @ teacher.sub_(logits, alpha=1.0 / t)[:, :, None]).view(-1)
            del teacher
            p_t = logits.div(t).exp_() if t != 1.0 else None
            p = logits.exp_()
            p_t = p if p_t is None else p_t
            sums = vocab.reduce(torch.stack((p.sum(dim=-1), p_t.sum(dim=-1), q.sum(dim=-1), target, cross)))
            sum_p, sum_p_t, sum_q, target, cross = sums
            weight = token_weight[span]
            ce = ((sum_p.log() - target) * weight).sum()
            kl = ((cross / sum_q - sum_q.log() + sum_p_t.log()) * weight).sum()
            terms = torch.stack((alpha * ce + kl_weight * kl, ce, kl))
            if not want_grads:
                return terms, None
            if t == 1.0:  # p_T is p: alpha p + (1 - alpha) p
                d_logits = p.mul_((weight / sum_p)[:, None])
            else:
                d_logits = p.mul_((alpha * weight / sum_p)[:, None])
                d_logits.addcmul_(p_t, ((1.0 - alpha) * t * weight / sum_p_t)[:, None])
            d_logits.addcmul_(q, (-(1.0 - alpha) * t * weight / sum_q)[:, None])
            return terms, d_logits.scatter_add_(1, column[span], -(alpha * weight * held[span])[:, None])

        return chunk_loss

    return make


def distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float,
                      chunk: int = 1024, teacher_precision=contextlib.nullcontext):
    """(loss, CE, KL): ``alpha * CE + (1 - alpha) * T^2 * KL(p_teacher || p_student)``, each a mean over
    the counted tokens, both KL distributions at ``temperature``.

    The fused loss's chunk loop with both models' logits: ``chunk`` tokens at a time from the final
    hidden states and lm_head weights (vocab-sharded DTensors under tensor parallelism, sharded
    alike), and the forward pass also forms the student's gradients. The two models share the
    vocabulary (a larger teacher's is cut to the student's). ``teacher_precision()`` is the autocast
    context of the teacher's matmuls. CE and KL are logged values, not differentiated.
    """
    make = _distillation_chunks(_token_rows(teacher_hidden, teacher_weight), teacher_weight, alpha, temperature,
                                teacher_precision)
    loss, ce, kl = _fused(student_hidden, student_weight, targets, chunk, make)
    return loss, ce.detach(), kl.detach()


def fused_loss_bytes(tokens: int, chunk_tokens: int, vocab_shard: int, width: int, compute_dtype: torch.dtype,
                     transposed_copy: bool = False) -> int:
    """Peak bytes the fused cross-entropy allocates on one rank for a micro-batch of ``tokens`` (its
    whole transient, forward and backward: the planner's loss term), counted from what
    ``_chunk_loop`` holds at once; ``transposed_copy`` as ``transposed_weight_copy`` says.

    Of a chunk (``chunk_tokens`` x ``vocab_shard`` logits): the fp32 buffer with, beside it, the
    compute-dtype matmul output it is upcast from, or later its gradient's compute-dtype copy with
    the chunk's grad_rows, then the weight-sized product for grad_weight. Of the micro-batch: grad_rows, and per token its
    target's column (int64), whether this shard holds it, its weight in the mean (fp32). Of the
    weight shard: its compute-dtype copy, and grad_weight's fp32 accumulator (which becomes the
    weight's gradient) once a second chunk adds to it.
    """
    size = torch.finfo(compute_dtype).bits // 8
    cast = 0 if compute_dtype == torch.float32 else size  # a compute-dtype copy beside an fp32 buffer
    logits = min(chunk_tokens, tokens) * vocab_shard
    weight = vocab_shard * width
    several = tokens > chunk_tokens
    accumulator = 4 * weight if several else 0
    upcast = logits * (4 + cast) + accumulator
    # grad_rows's chunk, then the product for grad_weight (fp32 compute adds it in place: addmm_)
    product = max(min(chunk_tokens, tokens) * width * size, weight * size if cast or not several else 0)
    gradient = logits * (cast or 4) + product + (4 * weight if cast else accumulator)
    fixed = tokens * (width * size + 8 + 1 + 4) + weight * (cast + (size if transposed_copy else 0))
    return fixed + max(upcast, gradient)

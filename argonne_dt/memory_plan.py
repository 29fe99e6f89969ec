"""The plan of a run on GPUs this machine does not have: memory per GPU, communication per step,
predicted step time, and the layouts ranked (the command line is ``benchmarks/memory_plan.py``).

No byte of activation memory comes from a formula written by hand:

- parameters, gradients and AdamW state are counted from the local shards of the really
  parallelized model, built on the meta device under a fake process group of the planned world
  size (and checked against the closed form);
- activations are measured: one block of the model at its real widths runs a training step at the
  planned micro-batch on fake tensors (shapes without memory or arithmetic) under bf16 autocast and
  a fake process group of the planned tensor-parallel degree, and ``StepRecorder`` follows every
  storage an operator creates until it is freed. What a block keeps for backward, the embedding's
  output, autocast's bf16 weight copies, the peak of one block's backward (with its recomputation),
  what FSDP2 keeps between micro-batches and (from a small real run scaled to the planned shape)
  the loss's transient come from such runs. The operators are the CPU's; a GPU's attention kernel
  may save a little more (the GPU check measures the whole step);
- communication: ``collective_bytes`` is the closed form of every collective of one step, tested
  equal to ``StepRecorder``'s count of a real gloo step for tp 2, dp 2 and 2 x 2.

Step time = FLOPs at a stated matmul efficiency + the communication that is not overlapped, over
stated link bandwidths (``GPUS``). Every assumption is in ``GPUS`` and ``RESERVE`` with its source.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from dataclasses import astuple, dataclass, replace

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

from .config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, check_tp_divides, load_config
from .distributed import build_layout, grad_accum_steps, sequence_parallel_in_effect
from .metrics import PEAK_BF16_FLOPS, PeakTensorBytes, local_tensor
from .parallelize import ModelTransforms, build_model

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """One GPU type: memory, dense bf16 peak, and the assumptions the step time rests on.

    ``matmul_efficiency``: the share of the peak that the step's FLOPs run at (large bf16 GEMMs reach
    about 70-80% in cuBLAS; attention, norms and elementwise work lower it); the GPU check measures
    it. ``nvlink_bytes_per_s``: one direction of one GPU's NVLink (NVSwitch within a node);
    ``network_bytes_per_s``: one GPU's InfiniBand NIC across nodes. ``link_efficiency``: the share
    of those that NCCL's ring collectives reach as bus bandwidth.
    """

    memory_gib: float
    peak_flops: float
    matmul_efficiency: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float
    nccl_buffers_gib: float
    per_node: int = 8
    link_efficiency: float = 0.8


# Sources: NVIDIA A100 datasheet (312 TFLOP/s dense bf16; NVLink 3: 600 GB/s per GPU, both
# directions together) and DGX A100 user guide (8 x 200 Gb/s HDR InfiniBand, one per GPU);
# H100 / H200 SXM datasheets (989 TFLOP/s dense bf16; NVLink 4: 900 GB/s per GPU both directions;
# 141 GB on H200) and DGX H100 / H200 (8 x 400 Gb/s NDR, one per GPU). NCCL buffers: ~0.25 GiB per
# communicator with the default NCCL_BUFFSIZE (4 MiB per channel and peer); NVLink SHARP (NVLS)
# on H100 / H200 NVSwitch systems reserves about 1 GiB more per communicator (NCCL docs,
# NCCL_NVLS_ENABLE). Matmul efficiency: an assumption, checked by the GPU check's step time.
GPUS = {
    "a100-40gb": Gpu(40, PEAK_BF16_FLOPS["a100"], 0.60, 300e9, 25e9, 0.25),
    "a100-80gb": Gpu(80, PEAK_BF16_FLOPS["a100"], 0.60, 300e9, 25e9, 0.25),
    "h100-80gb": Gpu(80, PEAK_BF16_FLOPS["h100"], 0.50, 450e9, 50e9, 1.25),
    "h200-141gb": Gpu(141, PEAK_BF16_FLOPS["h200"], 0.50, 450e9, 50e9, 1.25),
}
# Per GPU, whatever the layout; NCCL buffers come per communicator (``Gpu.nccl_buffers_gib``).
RESERVE = {
    # CUDA context (driver, kernels of torch and NCCL loaded lazily, CUDA 12): an assumption, not yet
    # measured on a GPU. The allocator's statistics do not include it; nvidia-smi's per-process figure
    # less torch.cuda.memory_reserved() would measure it.
    "cuda_context_gib": 0.5,
    # cuBLAS workspaces. Arithmetic: PyTorch's default CUBLAS_WORKSPACE_CONFIG ":4096:8" is 8 x 4 MiB
    # = 32 MiB per handle, one handle per stream that runs matmuls (forward / backward, and the side
    # streams): 4 x 32 MiB = 0.125 GiB. Kept: twice that, an assumption for cuBLASLt's workspaces and
    # other PyTorch versions' defaults; not yet measured on a GPU (the GPU check's memory_* checks
    # count it, as the caching allocator holds it).
    "cublas_workspace_gib": 0.25,
}
# Allocator slack: the caching allocator with expandable segments (the trainer's default) wastes
# little; 5% of the planned bytes is kept free for fragmentation and for what the plan misses.
ALLOCATOR_SLACK = 0.05
TOKEN_BUDGET = 21.9e9  # the original run's tokens (4b9.toml's schedule)

# The published architectures of Qwen2.5 teachers (their config.json): planning needs no weights.
QWEN25_TEACHERS = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_layers=48, num_heads=40, num_kv_heads=8),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40, num_kv_heads=8),
}


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of ``world_size`` ranks (this process is rank 0): collectives do nothing
    but give tensors of the right shapes, so one rank's memory and FLOPs are those of the real run."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_parameter_count(model: ModelConfig, parallel: ParallelConfig, tp: int, dp: int,
                          shard_root: bool = True) -> int:
    """Rank 0's parameter elements after TP (and FSDP over dp) on the meta device, fake process group."""
    return _local_parameter_count(astuple(model), astuple(replace(parallel, tp=tp, dp=dp)), shard_root)


@functools.lru_cache(maxsize=None)
def _local_parameter_count(model_key: tuple, parallel_key: tuple, shard_root: bool) -> int:
    parallel = ParallelConfig(*parallel_key)
    with fake_world(parallel.tp * parallel.dp):
        layout = build_layout(parallel, "cpu")
        built = build_model(ModelConfig(*model_key), layout, device="meta", shard_root=shard_root)
        return sum(local_tensor(p).numel() for p in built.parameters())


@functools.lru_cache(maxsize=None)
def _flops_per_token(model_key: tuple, seq: int) -> float:
    return build_model(ModelConfig(*model_key), device="meta").flops_per_token(seq)


def closed_form_parameters(m, tp: int, dp: int) -> int:
    """The same count by arithmetic: torch.chunk sizes for the vocab, whole heads per rank."""
    vocab_rows = math.ceil(m.vocab_size / tp)
    per_layer = (m.hidden_size * m.num_heads * m.head_dim * 2 // tp          # q and o
                 + m.hidden_size * m.num_kv_heads * m.head_dim * 2 // tp      # k and v
                 + 3 * m.hidden_size * m.ffn_dim // tp + 2 * m.hidden_size)   # SwiGLU, norms
    total = vocab_rows * m.hidden_size + m.num_layers * per_layer + m.hidden_size
    if dp == 1:
        return total
    # FSDP2 shards every tensor on dim 0 over dp (torch.chunk): rank 0 gets the ceiling.
    def fsdp(rows, cols=1):
        return math.ceil(rows / dp) * cols

    layer = (fsdp(m.num_heads * m.head_dim // tp, m.hidden_size) + fsdp(m.hidden_size, m.num_heads * m.head_dim // tp)
             + 2 * fsdp(m.num_kv_heads * m.head_dim // tp, m.hidden_size)
             + 2 * fsdp(m.ffn_dim // tp, m.hidden_size) + fsdp(m.hidden_size, m.ffn_dim // tp) + 2 * fsdp(m.hidden_size))
    return fsdp(vocab_rows, m.hidden_size) + m.num_layers * layer + fsdp(m.hidden_size)


def block_parameters(m: ModelConfig, tp: int) -> int:
    """One block's parameter elements on one tp rank (matrices split over tp, norms replicated)."""
    return (m.hidden_size * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim + 3 * m.hidden_size * m.ffn_dim) // tp \
        + 2 * m.hidden_size


# ---------------------------------------------------------------------------------------------
# Measurement


class StepRecorder(PeakTensorBytes):
    """``PeakTensorBytes`` (every storage an operator creates, followed until freed) that also counts
    every collective's bytes and tags autocast's copies of the parameters.

    ``sizes`` (see ``PeakTensorBytes``) maps a measured length to the planned one (the measured
    sequence to the planned micro-batch's tokens, a measured vocabulary shard to the real one): the
    peak of a small run is then the peak of the planned one (the measured lengths are chosen to
    differ from every other dimension of the model). An autocast copy of a parameter
    (``aten._to_copy`` of a parameter's storage) is tagged ``weight_copy``. Collectives: bytes of the
    whole tensor of each (an all-gather's output, a reduce-scatter's input, an all-reduce's tensor),
    by (collective, mesh dim name, or ``world``).
    """

    COLLECTIVES = {"all_gather_into_tensor": "all_gather", "_allgather_base_": "all_gather",
                   "allgather_into_tensor_coalesced_": "all_gather",
                   "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
                   "reduce_scatter_tensor_coalesced_": "reduce_scatter",
                   "all_reduce": "all_reduce", "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
                   "broadcast": "broadcast", "broadcast_": "broadcast"}

    local_operators = True

    def __init__(self, group_dims: dict[str, str] | None = None, parameters=(), sizes: dict[int, int] | None = None):
        super().__init__(*parameters, sizes=sizes)
        self.group_dims = group_dims or {}
        self.collectives: Counter = Counter()

    def tag_of(self, func, args, kwargs) -> str:
        name = func._schema.name.split("::")[-1]
        if name in self.COLLECTIVES:
            self._count(self.COLLECTIVES[name], func, args, kwargs)
        if name == "_to_copy" and StorageWeakRef(args[0].untyped_storage()).cdata in self.existing:
            return "weight_copy"
        return self.tag

    def _count(self, kind: str, func, args, kwargs) -> None:
        flat = tree_flatten((args, kwargs))[0]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        group = next(a for a in flat if isinstance(a, torch.ScriptObject)
                     or (isinstance(a, str) and a in self.group_dims))
        if isinstance(group, torch.ScriptObject):
            group = dist.ProcessGroup.unbox(group).group_name
        dim = self.group_dims.get(group, str(group))
        if func.namespace == "c10d":  # (output, input) of in-place c10d collectives
            size = tensors[1].nbytes if kind == "reduce_scatter" else tensors[0].nbytes
        else:  # functional: (input, ...), an all-gather's output is the group size times bigger
            size = tensors[0].nbytes * (_int_arg(flat) if kind == "all_gather" else 1)
        self.collectives[(kind, dim)] += size


def _int_arg(flat) -> int:
    return next(a for a in flat if isinstance(a, int) and not isinstance(a, bool))


def group_dims(layout) -> dict[str, str]:
    """Process group name -> the mesh dim it is (``tp``, ``dp``), or ``world`` for the default group."""
    dims = {dist.group.WORLD.group_name: "world"}
    names = layout.mesh.mesh_dim_names
    for name in names:
        dims[(layout.mesh[name] if len(names) > 1 else layout.mesh).get_group().group_name] = name
    return dims


@dataclass(frozen=True)
class ActivationBytes:
    """Measured bytes of one rank at the planned micro-batch (see ``measured_activations``)."""

    block_kept: int             # one block, kept from its forward to its backward
    embedding_kept: int         # the embedding's output and what its backward keeps
    block_backward_peak: int    # above everything kept, during one block's backward (recompute included)
    weight_copies_per_block: int  # autocast's bf16 copies of one block's weights, kept forward to backward
    loss_peak: int              # the loss's transient (its forward and backward) above everything kept
    loss_chunk: int             # tokens whose logits exist at once (0: the whole micro-batch)


def _second_of_two(measure):
    """Measure twice, keep the second: the first time DTensor's sharding propagation meets an operator
    at a shape, it runs operators of its own (on fake copies of the inputs, outputs it keeps in its
    cache) that a storage tracker would count; a step is measured as it runs from its second on."""
    @functools.wraps(measure)
    def second(*args, **kwargs):
        measure(*args, **kwargs)
        return measure(*args, **kwargs)

    return second


def _filled(model) -> None:
    """Parameters set to a small constant and gradients to zeros (accumulation adds in place, as from
    the second micro-batch on): the memory of a step does not depend on the values, and seeded
    initialization of a 4b9 block takes 15 s on this CPU."""
    with torch.no_grad():
        for param in model.parameters():
            local_tensor(param).fill_(0.01)
            param.grad = torch.zeros_like(param)


def _step_layout(tp: int, dp: int, sp: bool):
    return build_layout(ParallelConfig(tp=tp, dp=dp, sequence_parallel=sp), "cpu")


@contextlib.contextmanager
def _fake_tensors(model):
    """Allocate the meta-device ``model`` as fake CPU tensors (shapes, dtypes and storages without
    memory or arithmetic): a step at the planned shape costs no time, whatever its size."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.init_buffers()
        with torch.no_grad():
            for param in model.parameters():
                param.grad = torch.zeros_like(param)
        yield


@functools.lru_cache(maxsize=None)
@_second_of_two
def _measure(model_key: tuple, tp: int, sp: bool, ac: str, micro_batch: int, seq: int, device: str) -> ActivationBytes:
    m = ModelConfig(*model_key)
    # One block at the real widths; a vocabulary of 64 rows per rank keeps the embedding out of the way.
    one_block = replace(m, num_layers=1, vocab_size=64 * tp, max_seq_len=max(seq, m.max_seq_len))
    with fake_world(tp):
        layout = _step_layout(tp, 1, sp)
        model = build_model(one_block, layout, device="meta", transforms=ModelTransforms(activation_checkpoint=ac))
        with _fake_tensors(model):
            recorder = StepRecorder(group_dims(layout), model.parameters())
            after_block = {}

            def phase(name, record=False):
                def hook(*_):
                    recorder.tag = name
                    if record:
                        after_block.update({tag: recorder.live_bytes(tag) for tag in ("embedding", "block", "weight_copy")})
                return hook

            model.embed.register_forward_pre_hook(phase("embedding"))
            model.layers[0].register_forward_pre_hook(phase("block"))
            model.layers[0].register_forward_hook(phase("head", record=True))
            ids = torch.zeros(micro_batch, seq, dtype=torch.long)
            with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
                hidden = local_tensor(model(ids, head=lambda model, hidden, targets: hidden))
                kept = recorder.mark()
                # The block's backward alone: its output's gradient arrives as the loss's would.
                hidden.backward(torch.ones_like(hidden))
            backward_peak = recorder.peak - kept
    loss_peak, chunk = _measure_loss(model_key, tp, sp, micro_batch * seq, device=device)
    return ActivationBytes(after_block["block"], after_block["embedding"], max(0, backward_peak),
                           after_block["weight_copy"], loss_peak, chunk)


def _small_model(m: ModelConfig, tp: int, rows: int, seq: int, layout, weights_dtype=torch.float32):
    """``m`` at its real hidden width with one thin block and ``rows`` vocabulary rows per tp rank,
    real tensors set to a constant (only the loss's shapes matter)."""
    small = replace(m, num_layers=1, vocab_size=rows * tp, num_heads=tp, num_kv_heads=tp, head_dim=8,
                    intermediate_size=64 * tp, max_seq_len=seq)
    model = build_model(small, layout, device="cpu", weights_dtype=weights_dtype)
    _filled(model)
    return model


@functools.lru_cache(maxsize=None)
@_second_of_two
def _measure_loss(model_key: tuple, tp: int, sp: bool, tokens: int, teacher_key: tuple | None = None,
                  device: str = "cuda") -> tuple[int, int]:
    """The loss's transient peak (its forward and backward, by the model's own loss path, or the
    distillation loss with ``teacher_key``'s model) at the planned tokens and the real vocabulary
    shard, from a run at the real hidden widths with three chunks of a few tokens and a small
    vocabulary shard (``StepRecorder``'s ``sizes``); and the loss's chunk of tokens. The loss runs
    as on ``device`` (``loss.weight_layout_as``), whatever this CPU does natively."""
    from .loss import distillation_loss, loss_context, weight_layout_as

    m = ModelConfig(*model_key)
    rows, chunk_measured = 521, 37 * tp  # lengths no other dimension of the planned models has
    seq = 3 * chunk_measured
    with fake_world(tp):
        layout = _step_layout(tp, 1, sp)
        model = _small_model(m, tp, rows, seq, layout)
        chunk = getattr(model, "fused_loss_chunk", 0)
        if chunk:
            model.fused_loss_chunk = chunk_measured
        in_flight = min(chunk, tokens) if chunk else tokens
        sizes = {rows: math.ceil(m.vocab_size / tp), seq: tokens, chunk_measured: in_flight}
        if tp > 1:
            sizes[seq // tp] = tokens // tp
        ids = torch.zeros(1, seq, dtype=torch.long)
        states = lambda model, hidden, targets: hidden  # noqa: E731 - the final hidden states, no loss
        recorder = StepRecorder(group_dims(layout), model.parameters(), sizes)
        with torch.autocast("cpu", dtype=torch.bfloat16), loss_context(layout), weight_layout_as(device):
            hidden = model(ids, head=states).detach().requires_grad_()
            if teacher_key is None:
                loss = lambda: model.loss_from_hidden(hidden, ids)  # noqa: E731
            else:
                teacher = _small_model(ModelConfig(*teacher_key), tp, rows, seq, layout, torch.bfloat16)
                with torch.no_grad():
                    teacher_hidden = teacher(ids, head=states)
                loss = lambda: distillation_loss(hidden, model.lm_head.weight, teacher_hidden,  # noqa: E731
                                                 teacher.lm_head.weight, ids, 0.5, 1.0, model.fused_loss_chunk)[0]
            with recorder:
                start = recorder.mark()
                loss().backward()
    return recorder.peak - start, chunk


def measured_activations(m: ModelConfig, tp: int, sp: bool, ac: str, micro_batch: int, seq: int,
                         device: str = "cuda") -> ActivationBytes:
    """``ActivationBytes`` of model ``m`` at tensor-parallel degree ``tp`` for a micro-batch of
    ``micro_batch`` x ``seq`` tokens, measured (once per process): one block's training step at
    the planned shape on fake tensors under a fake process group of ``tp`` ranks; the loss's
    transient from a small real run (``_measure_loss``) as the loss runs on ``device``."""
    return _measure(astuple(m), tp, sp and tp > 1, ac, micro_batch, seq, str(device))


@functools.lru_cache(maxsize=None)
@_second_of_two
def measured_fsdp_retained(model_key: tuple, tp: int, micro_batch: int, seq: int) -> int:
    """Bytes per block that FSDP2 keeps from one micro-batch to the next without gradient sync
    (gradient accumulation): measured after a backward under ``set_requires_gradient_sync(False)``
    with the block sharded over a fake dp of 2, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = ModelConfig(*model_key)
    one_block = replace(m, num_layers=1, vocab_size=64 * tp, max_seq_len=max(seq, m.max_seq_len))
    with fake_world(tp * 2):
        layout = _step_layout(tp, 2, tp > 1)
        model = build_model(one_block, layout, device="meta", param_dtype=torch.bfloat16)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            model.init_buffers()
            recorder = StepRecorder(group_dims(layout), model.parameters())
            model.set_requires_gradient_sync(False)
            with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
                hidden = local_tensor(model(torch.zeros(micro_batch, seq, dtype=torch.long),
                                      head=lambda model, hidden, targets: hidden))
                hidden.backward(torch.ones_like(hidden))
                del hidden
            # The root's share (a vocabulary of 64 rows per rank) is negligible beside a block's.
            return recorder.live_bytes()


# ---------------------------------------------------------------------------------------------
# Communication


def _local_tensor_shapes(m: ModelConfig, tp: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(one block's, the root's) parameter shapes on tp rank 0: matrices split over tp (the
    vocabulary by torch.chunk), norms whole; 1-D tensors as (rows, 1)."""
    q, kv, f, d = m.num_heads * m.head_dim // tp, m.num_kv_heads * m.head_dim // tp, m.ffn_dim // tp, m.hidden_size
    block = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f), (d, 1), (d, 1)]
    if m.attention_bias:
        block += [(q, 1), (kv, 1), (kv, 1)]
    vocab = (math.ceil(m.vocab_size / tp), d)
    root = [vocab, (d, 1)] + ([] if m.tie_embeddings else [vocab])
    return block, root


def _padded(shapes: list[tuple[int, int]], dp: int) -> int:
    """Elements of ``shapes`` as FSDP2 gathers them: dim 0 padded to a multiple of dp."""
    return sum(math.ceil(rows / dp) * dp * cols for rows, cols in shapes)


def _sequence_parallel_forward(m: ModelConfig, tokens: int, embedding_bytes: int) -> tuple[int, int]:
    """(all-gather, reduce-scatter) bytes of one forward of ``m`` under sequence parallelism: each
    block gathers its attention and MLP inputs onto the whole sequence and reduce-scatters the outputs
    of o_proj and down_proj (bf16); the embedding's partial sums are reduce-scattered (in the weights'
    dtype: ``embedding_bytes`` per element), the lm_head's input gathered."""
    activation = 2 * tokens * m.hidden_size
    return 2 * m.num_layers * activation + activation, 2 * m.num_layers * activation + embedding_bytes * tokens * m.hidden_size


def collective_bytes(m: ModelConfig, tp: int, dp: int, ac: str, micro_batch: int, seq: int, micro_batches: int,
                     reshard_after_forward: bool = True, teacher: ModelConfig | None = None,
                     teacher_fsdp: bool = False) -> Counter:
    """Bytes of every collective of one optimizer step on tp rank 0, by (collective, mesh dim):
    whole tensors (an all-gather's output, a reduce-scatter's input, an all-reduce's tensor), as
    ``StepRecorder`` counts them; tested equal to its count of the real step for tp 2, dp 2 and 2 x 2.
    Tensor parallelism with sequence parallelism (the default; the planner plans no other), bf16
    autocast, FSDP2 gathering in bf16 and reducing in fp32. With ``teacher`` (bf16 weights, forward
    only, blocks sharded over dp with ``teacher_fsdp``): distillation's step.
    """
    counts: Counter = Counter()
    block, root = _local_tensor_shapes(m, tp)
    layers, width, tokens = m.num_layers, m.hidden_size, micro_batch * seq
    if tp > 1:
        activation = 2 * tokens * width                           # bf16 (tokens x hidden)
        forward_gathers, forward_scatters = _sequence_parallel_forward(m, tokens, 2 if dp > 1 else 4)
        # Backward: each of the forward's collectives the other way round, at the same size.
        gathers = scatters = forward_gathers + forward_scatters
        if ac in ("full", "selective"):  # the block's forward again in backward
            # Recomputation stops after the last saved tensor it needs: down_proj's reduction is not redone.
            gathers += 2 * layers * activation
            scatters += layers * activation
        # The loss's reductions over the vocabulary shards, fp32 per token: pretraining's max, then the
        # sum of exponentials with the target's logit; distillation's two maxima (student, teacher),
        # then five sums (p, p_T, q, the target's logit, the cross term).
        loss_rows = 7 if teacher else 3
        # and the gradients of the replicated norm weights (their dp shard)
        reductions = loss_rows * 4 * tokens + 4 * (2 * layers + 1) * math.ceil(width / dp)
        if teacher:  # its forward in bf16, its final hidden states gathered for the loss
            teacher_gathers, teacher_scatters = _sequence_parallel_forward(teacher, tokens, 2)
            gathers += teacher_gathers
            scatters += teacher_scatters
        counts[("all_gather", "tp")] += micro_batches * gathers
        counts[("reduce_scatter", "tp")] += micro_batches * scatters
        counts[("all_reduce", "tp")] += micro_batches * reductions
    if dp > 1:
        gathers_per_block = 2 if reshard_after_forward else 1    # forward, and again for backward
        counts[("all_gather", "dp")] += micro_batches * 2 * (gathers_per_block * layers * _padded(block, dp)
                                                             + _padded(root, dp))
        if teacher and teacher_fsdp:  # each teacher block gathered once per micro-batch (no backward)
            counts[("all_gather", "dp")] += micro_batches * 2 * teacher.num_layers * _padded(
                _local_tensor_shapes(teacher, tp)[0], dp)
        # Gradients reduce-scattered once per step (after the last micro-batch), in fp32.
        counts[("reduce_scatter", "dp")] += 4 * (layers * _padded(block, dp) + _padded(root, dp))
    # Gradient clipping: the per-tensor norms (fp32) reduced over each sharded mesh dim.
    tensors = layers * len(block) + len(root)
    for dim, size in (("tp", tp), ("dp", dp)):
        if size > 1:
            counts[("all_reduce", dim)] += 4 * tensors
    # The step's loss terms averaged over the dp group (fp32; its tp ranks hold the same): pretraining's
    # loss; distillation's loss, CE and KL.
    if dp > 1:
        counts[("all_reduce", "dp")] += 4 * (3 if teacher else 1)
    return counts


# ---------------------------------------------------------------------------------------------
# The plan


def teacher_model(name: str, student: ModelConfig) -> ModelConfig:
    """A Qwen2.5 teacher as the distillation builds it: biases, untied, its vocabulary cut to the student's."""
    shape = QWEN25_TEACHERS[name]
    return ModelConfig(vocab_size=student.vocab_size, head_dim=shape["hidden_size"] // shape["num_heads"],
                       max_seq_len=student.max_seq_len, rope_theta=1e6, attention_bias=True, tie_embeddings=False,
                       **shape)


@functools.lru_cache(maxsize=None)
@_second_of_two
def _measure_teacher_forward(model_key: tuple, tp: int, sp: bool, micro_batch: int, seq: int) -> tuple[int, int]:
    """(peak above what it keeps, what it keeps) of a bf16 teacher block's forward without gradients,
    at the planned shape on fake tensors: the teacher's working set beside the student's step."""
    m = ModelConfig(*model_key)
    one_block = replace(m, num_layers=1, vocab_size=64 * tp, max_seq_len=max(seq, m.max_seq_len))
    with fake_world(tp):
        layout = _step_layout(tp, 1, sp)
        model = build_model(one_block, layout, device="meta", weights_dtype=torch.bfloat16)
        with _fake_tensors(model):
            recorder = StepRecorder(group_dims(layout), model.parameters())
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), recorder:
                hidden = model(torch.zeros(micro_batch, seq, dtype=torch.long),  # noqa: F841 - kept: counted as live
                               head=lambda model, hidden, targets: hidden)
                return recorder.peak - recorder.live_bytes(), recorder.live_bytes()


def teacher_bytes(name: str, student: ModelConfig, parallel: ParallelConfig, tp: int, dp: int, batch: int, seq: int,
                  shard_over_dp: bool) -> dict:
    """Per-GPU bytes a bf16 teacher adds to a step: its weights (counted from its meta-device shards),
    its forward's working set and the final hidden states it keeps for the loss, and the distillation
    loss's transient (measured, in place of pretraining's loss)."""
    model = teacher_model(name, student)
    try:
        check_tp_divides(model, tp)
    except ConfigError as err:
        return {"runs": False, "reason": str(err)}
    params = local_parameter_count(model, parallel, tp, dp if shard_over_dp else 1, shard_root=False)
    sp = sequence_parallel_in_effect(parallel, tp)
    working, kept = _measure_teacher_forward(astuple(model), tp, sp, batch, seq)
    kl, _ = _measure_loss(astuple(student), tp, sp, batch * seq, astuple(model))
    forward_flops = _flops_per_token(astuple(model), seq) / 3  # forward: a third of fwd + bwd
    return {"runs": True, "local_parameters": params, "weights": 2 * params, "activations": working + kept,
            "loss_transient": kl, "total": 2 * params + working + kept + kl,
            # The teacher's forward, its lm_head included; the student's logits and their two gradient
            # matmuls replace pretraining's fused loss one for one.
            "flops_per_token": forward_flops}


def _ring_seconds(counts: Counter, dim: str, ranks: int, bytes_per_s: float) -> float:
    """NCCL ring time of the collectives on ``dim``: each rank moves (n-1)/n of an all-gather's or
    reduce-scatter's whole tensor, twice that for an all-reduce."""
    moved = sum(size * (2 if kind == "all_reduce" else 1) for (kind, d), size in counts.items() if d == dim)
    return moved * (ranks - 1) / ranks / bytes_per_s if ranks > 1 else 0.0


def fsdp_exposed_seconds(gather_s: float, scatter_s: float, in_line_s: float, first_gather_s: float,
                         last_scatter_s: float, compute_s: float, last_backward_s: float, micro_batches: int) -> float:
    """The part of a step's FSDP2 communication that compute does not hide (every argument in seconds
    of one optimizer step, all micro-batches together unless named otherwise).

    Gathers (``gather_s``): in each micro-batch the first ones (the root's and the first block's,
    ``first_gather_s``) wait with nothing to overlap; the others are prefetched behind that
    micro-batch's compute. The gradients' reduce-scatter (``scatter_s``) runs once per step, during
    the last micro-batch's backward (``last_backward_s``), and the root's (``last_scatter_s``, ready
    only when the backward ends) after it. All-reduces (``in_line_s``: clipping's norms, the loss
    terms) wait in line. The link carries the last backward's gathers beside its reduce-scatters:
    that contention is not modelled.
    """
    per_batch_gather, per_batch_compute = gather_s / micro_batches, compute_s / micro_batches
    gathers = micro_batches * (first_gather_s + max(0.0, per_batch_gather - first_gather_s - per_batch_compute))
    scatter = last_scatter_s + max(0.0, scatter_s - last_scatter_s - last_backward_s)
    return gathers + scatter + in_line_s


def step_batch(train: TrainConfig, micro_batch: int, dp: int) -> tuple[int, int]:
    """(sequences, micro-batches per dp rank) of the step the trainer runs with ``train`` at
    ``micro_batch`` sequences a micro-batch on ``dp`` ranks, as the layout divides it
    (``distributed.grad_accum_steps``): ``train.global_batch_size`` whatever the layout, else
    ``train.grad_accum_steps`` micro-batches on each rank."""
    try:
        micro_batches = grad_accum_steps(replace(train, micro_batch_size=micro_batch), dp)
    except ConfigError as err:
        raise ConfigError(f"a micro-batch of {micro_batch} on {dp} dp rank(s): {err}") from None
    return micro_batch * micro_batches * dp, micro_batches


def _planned_memory(m: ModelConfig, params: int, acts: ActivationBytes, tp: int, dp: int, reshard: bool,
                    micro_batch: int, seq: int, micro_batches: int) -> dict[str, float]:
    """Bytes per GPU of a step, by what holds them (the teacher's are added by ``plan``)."""
    memory = {"parameters_fp32": 4 * params, "gradients_fp32": 4 * params, "adamw_state_fp32": 8 * params,
              "activations_kept": acts.embedding_kept + m.num_layers * acts.block_kept,
              "transient_peak": max(acts.block_backward_peak, acts.loss_peak)}
    if dp == 1:  # autocast's bf16 weight copies live from a block's forward to the end of its backward
        memory["autocast_weight_copies"] = m.num_layers * acts.weight_copies_per_block
    else:  # FSDP2 gathers bf16 weights: the root's for the whole step, two blocks at a time (or all kept)
        blocks_gathered = 2 if reshard else m.num_layers
        root_shapes = _local_tensor_shapes(m, tp)[1]
        memory["fsdp_gathered_bf16"] = 2 * (blocks_gathered * block_parameters(m, tp)
                                            + sum(r * c for r, c in root_shapes))
        if micro_batches > 1:
            memory["fsdp_accumulated_gradients"] = m.num_layers * measured_fsdp_retained(astuple(m), tp, micro_batch, seq)
    return memory


def _reserve(memory: dict[str, float], tp: int, dp: int, gpu_spec: Gpu) -> dict[str, float]:
    """What the process holds besides tensors: CUDA context, cuBLAS workspaces, NCCL buffers, slack."""
    communicators = (tp > 1) + (dp > 1) + (tp > 1 and dp > 1)  # tp, dp and the world group
    reserve = {"cuda_context": RESERVE["cuda_context_gib"] * GIB, "cublas_workspace": RESERVE["cublas_workspace_gib"] * GIB,
               "nccl_buffers": communicators * gpu_spec.nccl_buffers_gib * GIB}
    reserve["allocator_slack"] = ALLOCATOR_SLACK * (sum(memory.values()) + sum(reserve.values()))
    return reserve


def _step_seconds(m: ModelConfig, counts: Counter, tp: int, dp: int, gpu_spec: Gpu, compute_s: float,
                  last_backward_s: float, micro_batches: int) -> dict[str, float]:
    """The step's time on one GPU: compute, the tp collectives (exposed: DTensor runs them in line
    with the compute), FSDP2's collectives and what compute leaves of them exposed."""
    nvlink = gpu_spec.nvlink_bytes_per_s * gpu_spec.link_efficiency
    dp_link = nvlink if tp * dp <= gpu_spec.per_node else gpu_spec.network_bytes_per_s * gpu_spec.link_efficiency
    tp_s = _ring_seconds(counts, "tp", tp, nvlink)
    dp_s = _ring_seconds(counts, "dp", dp, dp_link)
    exposed_dp_s = 0.0
    if dp > 1:
        def seconds(collective, size):
            return _ring_seconds(Counter({(collective, "dp"): size}), "dp", dp, dp_link)

        block_shapes, root_shapes = _local_tensor_shapes(m, tp)
        exposed_dp_s = fsdp_exposed_seconds(
            gather_s=seconds("all_gather", counts[("all_gather", "dp")]),
            scatter_s=seconds("reduce_scatter", counts[("reduce_scatter", "dp")]),
            in_line_s=seconds("all_reduce", counts[("all_reduce", "dp")]),
            first_gather_s=seconds("all_gather", 2 * (_padded(root_shapes, dp) + _padded(block_shapes, dp))),
            last_scatter_s=seconds("reduce_scatter", 4 * _padded(root_shapes, dp)),
            compute_s=compute_s, last_backward_s=last_backward_s, micro_batches=micro_batches)
    return {"compute_s": compute_s, "tp_comm_s": tp_s, "dp_comm_s": dp_s, "exposed_dp_comm_s": exposed_dp_s,
            "step_s": compute_s + tp_s + exposed_dp_s}


def plan(config: str, tp: int, dp: int, gpu: str, micro_batch: int, seq: int | None, ac: str,
         teacher: str | None = None, teacher_fsdp: bool = False) -> dict:
    """Per-GPU memory, communication and predicted step time of a run with tensor parallelism
    ``tp`` (with sequence parallelism) x FSDP2 over ``dp`` on ``gpu``; with ``teacher`` (a Qwen2.5
    name), of distilling from it. One optimizer step is the one the trainer runs (``step_batch``)."""
    cfg = load_config(config)
    m, gpu_spec = cfg.model, GPUS[gpu]
    parallel = replace(cfg.parallel, sequence_parallel=True)  # the planner plans TP with sequence parallelism
    seq = seq or cfg.data.seq_len
    sequences, micro_batches = step_batch(cfg.train, micro_batch, dp)
    check_tp_divides(m, tp)
    params = local_parameter_count(m, parallel, tp, dp)
    expected = closed_form_parameters(m, tp, dp)
    if params != expected:
        raise AssertionError(f"meta-device shards hold {params:,} parameters, the closed form says {expected:,}")
    reshard = tp * dp <= gpu_spec.per_node  # parallelize.reshard_after_forward's "auto": dp within a node
    acts = measured_activations(m, tp, parallel.sequence_parallel, ac, micro_batch, seq)
    memory = _planned_memory(m, params, acts, tp, dp, reshard, micro_batch, seq, micro_batches)
    flops_per_token = _flops_per_token(astuple(m), seq)
    forward_per_token = flops_per_token / 3  # forward: a third of forward + backward
    # Recomputation: full checkpointing runs each block's forward again (a third of its share of the
    # FLOPs); selective keeps the matmul and attention outputs, so what it recomputes costs no FLOPs.
    lm_head = 6 * m.vocab_size * m.hidden_size
    executed_per_token = flops_per_token + ((flops_per_token - lm_head) / 3 if ac == "full" else 0)
    distilling, teacher_shape = {}, None
    if teacher:
        extra = teacher_bytes(teacher, m, parallel, tp, dp, micro_batch, seq, teacher_fsdp)
        distilling = {"teacher": teacher, "teacher_fsdp": teacher_fsdp, "teacher_runs": extra["runs"],
                      "teacher_reason": extra.get("reason", "")}
        if extra["runs"]:
            memory["teacher_weights_bf16"] = extra["weights"]
            memory["teacher_forward"] = extra["activations"]
            memory["transient_peak"] = max(acts.block_backward_peak, extra["loss_transient"])
            flops_per_token += extra["flops_per_token"]
            executed_per_token += extra["flops_per_token"]
            forward_per_token += extra["flops_per_token"]
            teacher_shape = teacher_model(teacher, m)
            distilling["teacher_local_parameters"] = extra["local_parameters"]
    reserve = _reserve(memory, tp, dp, gpu_spec)
    total = sum(memory.values()) + sum(reserve.values())

    step_tokens, gpus = sequences * seq, tp * dp
    compute_s = step_tokens * executed_per_token / gpus / (gpu_spec.peak_flops * gpu_spec.matmul_efficiency)
    counts = collective_bytes(m, tp, dp, ac, micro_batch, seq, micro_batches, reshard, teacher_shape, teacher_fsdp)
    last_backward_s = compute_s / micro_batches * (1 - forward_per_token / executed_per_token)
    times = _step_seconds(m, counts, tp, dp, gpu_spec, compute_s, last_backward_s, micro_batches)
    tokens_per_s = step_tokens / times["step_s"]
    budget = cfg.train.steps * step_tokens if cfg.train.steps else TOKEN_BUDGET
    fits = total <= gpu_spec.memory_gib * GIB and distilling.get("teacher_runs", True)
    return {
        "config": config, "gpu": gpu, "gpus": gpus, "tp": tp, "dp": dp, "micro_batch": micro_batch,
        "micro_batches": micro_batches, "seq_len": seq, "tokens_per_step": step_tokens,
        "activation_checkpoint": ac, "sequence_parallel": sequence_parallel_in_effect(parallel, tp),
        "local_parameters": params, **distilling,
        "memory_gib": {k: v / GIB for k, v in memory.items()}, "reserve_gib": {k: v / GIB for k, v in reserve.items()},
        "activations_per_layer_gib": acts.block_kept / GIB, "loss_chunk": acts.loss_chunk,
        "total_gib": total / GIB, "gpu_gib": gpu_spec.memory_gib, "fits": fits,
        "collective_bytes": {f"{kind}/{dim}": size for (kind, dim), size in sorted(counts.items())},
        **times, "predicted_tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / (gpus * gpu_spec.peak_flops),
        "token_budget": budget, "predicted_days": budget / tokens_per_s / 86400,
        "assumptions": {"matmul_efficiency": gpu_spec.matmul_efficiency, "nvlink_GBps": gpu_spec.nvlink_bytes_per_s / 1e9,
                        "network_GBps": gpu_spec.network_bytes_per_s / 1e9, "link_efficiency": gpu_spec.link_efficiency,
                        "gpus_per_node": gpu_spec.per_node},
    }


def layouts(config: str, gpus: int, gpu: str, teacher: str | None = None, teacher_fsdp: bool = False) -> list[dict]:
    """Every layout of ``gpus`` GPUs (tp within a node x dp, checkpoint mode, micro-batch) that fits,
    fastest first (then the least memory). The micro-batch varies only under a
    ``train.global_batch_size``; without one it would change the step itself, so it stays the config's."""
    cfg = load_config(config)
    rows = []
    for tp in (t for t in (1, 2, 4, 8) if gpus % t == 0 and t <= GPUS[gpu].per_node):
        try:
            check_tp_divides(cfg.model, tp)
        except ConfigError:
            continue
        dp = gpus // tp
        for micro_batch in (1, 2, 4, 8, 16) if cfg.train.global_batch_size else (cfg.train.micro_batch_size,):
            try:
                step_batch(cfg.train, micro_batch, dp)
            except ConfigError:  # the global batch cannot be formed from it on dp ranks
                continue
            for ac in ("none", "selective", "full"):
                rows.append(plan(config, tp, dp, gpu, micro_batch, None, ac, teacher, teacher_fsdp))
    fitting = [r for r in rows if r["fits"]]
    # At equal predicted speed, less recomputation (selective's norms and activations are memory-bound
    # work the FLOP count leaves out), then less memory.
    recompute = {"none": 0, "selective": 1, "full": 2}
    return sorted(fitting, key=lambda r: (-round(r["predicted_tokens_per_s"]), recompute[r["activation_checkpoint"]],
                                          r["total_gib"]))

"""The process group, the parallel layout of the run, and the dtype its matmuls run in.

``ParallelLayout`` is built once per process (``build_layout``) and passed to everything that
must know how the world is split: the model factory, the data loader, the trainer, generation,
the benchmarks and the tests. It is the one place that computes the run's arithmetic: dp from the
world and tp, gradient accumulation, tokens per step, whether sequence and loss parallelism are
in effect.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from .config import Config, ConfigError, ParallelConfig, TrainConfig
from .metrics import logger

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
log = logger(__name__)


# Rank 0 alone reads every parquet footer and makes the first batch while its peers wait in a
# collective: the default 10 minutes of NCCL can run out on a large corpus.
DEFAULT_TIMEOUT_MINUTES = 30.0


def cuda_environment_defaults() -> None:
    """Environment defaults for CUDA runs, left alone where the user set them: the caching allocator
    grows segments instead of fragmenting (read when CUDA first allocates, so set before that)."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def local_device() -> torch.device:
    """This process's GPU (``cuda:LOCAL_RANK``, made the current device) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    cuda_environment_defaults()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> torch.device:
    """Join the torchrun process group (or make a group of one); cuda + nccl when GPUs exist.

    The GPU is chosen before the group starts and passed as ``device_id``: NCCL then binds each
    rank to its own GPU at once instead of guessing from the rank. ``timeout_minutes`` bounds every
    wait in a collective (``parallel.timeout_minutes``).
    """
    device = local_device()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python launch/...`: a world of one
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    return device


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel degree on ``world_size`` ranks (dp = -1 means world_size / tp); checks dp * tp = world."""
    tp, dp = parallel.tp, parallel.dp
    if world_size % tp and dp == -1:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp={tp}")
    dp = world_size // tp if dp == -1 else dp
    if dp * tp != world_size:
        raise ConfigError(f"world size {world_size} must equal parallel.dp * parallel.tp = {dp} * {tp}")
    return dp


def grad_accum_steps(train: TrainConfig, dp: int) -> int:
    """Micro-batches per optimizer step on ``dp`` ranks: ``train.grad_accum_steps``, or derived from
    ``train.global_batch_size`` = micro_batch_size x grad_accum_steps x dp, which must come out whole."""
    if not train.global_batch_size:
        return train.grad_accum_steps
    per_micro_step = train.micro_batch_size * dp
    if train.global_batch_size % per_micro_step:
        lower = train.global_batch_size // per_micro_step * per_micro_step
        nearest = [value for value in (lower, lower + per_micro_step) if value > 0]
        sizes = [m for m in range(1, train.global_batch_size + 1) if train.global_batch_size % (m * dp) == 0]
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} cannot be formed on {dp} dp rank(s) from "
            f"train.micro_batch_size={train.micro_batch_size}: it must be a multiple of micro_batch_size x dp = "
            f"{per_micro_step}; nearest valid global_batch_size: {' or '.join(map(str, nearest))}"
            + (f"; or train.micro_batch_size in {sizes[:8]}" if sizes else "; or run on a dp size that divides it")
        )
    accum = train.global_batch_size // per_micro_step
    if train.grad_accum_steps not in (1, accum):
        raise ConfigError(
            f"train.grad_accum_steps={train.grad_accum_steps} contradicts train.global_batch_size="
            f"{train.global_batch_size} (which gives {accum} on {dp} dp rank(s) of micro_batch_size "
            f"{train.micro_batch_size}): leave grad_accum_steps at 1 when global_batch_size is set")
    return accum


def sequence_parallel_in_effect(parallel: ParallelConfig, tp: int) -> bool:
    """Sequence parallelism shards between tp ranks: asked for and tp > 1."""
    return parallel.sequence_parallel and tp > 1


@dataclass(frozen=True)
class ParallelLayout:
    """How this process's world is split: a ("dp", "tp") mesh, or ("tp",) when dp is 1.

    ``parallel`` is the run's parallel config with dp resolved; ``sequence_parallel`` and
    ``loss_parallel`` say whether those are in effect (they need tp > 1). ``grad_accum_steps`` and
    ``micro_batch_size`` x ``seq_len`` (one micro-batch of one dp rank) give the tokens of a step.
    """

    mesh: DeviceMesh
    parallel: ParallelConfig
    rank: int
    world_size: int
    dp_rank: int
    tp_rank: int
    grad_accum_steps: int = 1
    micro_batch_size: int = 1
    seq_len: int = 0

    @property
    def tp(self) -> int:
        return self.parallel.tp

    @property
    def dp(self) -> int:
        return self.parallel.dp

    @property
    def device_type(self) -> str:
        return self.mesh.device_type

    @property
    def sequence_parallel(self) -> bool:
        return sequence_parallel_in_effect(self.parallel, self.tp)

    @property
    def loss_parallel(self) -> bool:
        """The full-logits loss runs on vocab-sharded logits, under ``loss_parallel()``."""
        return self.parallel.loss_parallel and self.tp > 1

    @property
    def sequence_multiple(self) -> int:
        """What a sequence's length must be a multiple of: tp under sequence parallelism (each tp rank
        holds an equal slice of the positions), else 1."""
        return self.tp if self.sequence_parallel else 1

    @property
    def tokens_per_micro_batch(self) -> int:
        """Tokens of one micro-batch of one dp rank."""
        if not self.seq_len:
            raise ValueError("this layout was built without the run's batch: build_layout(..., train=cfg.train, "
                             "seq_len=cfg.data.seq_len), or run_layout(cfg), knows its tokens")
        return self.micro_batch_size * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all dp ranks."""
        return self.tokens_per_micro_batch * self.grad_accum_steps * self.dp

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh if self.mesh.ndim == 1 else self.mesh["tp"]

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        return self.mesh["dp"] if self.mesh.ndim == 2 and self.dp > 1 else None

    @property
    def tp_group(self):
        """The process group of this rank's tp peers; None when tp is 1 (nothing to share)."""
        return self.tp_mesh.get_group() if self.tp > 1 else None

    @property
    def dp_group(self):
        """The process group of this rank's dp peers; None when dp is 1."""
        return self.dp_mesh.get_group() if self.dp_mesh is not None else None

    @property
    def reads_data(self) -> bool:
        """One rank per tp group reads the data; its peers receive the batches."""
        return self.tp_rank == 0


def build_layout(parallel: ParallelConfig, device_type: str, world_size: int | None = None,
                 train: TrainConfig | None = None, seq_len: int = 0) -> ParallelLayout:
    """The layout of the current process group (``world_size`` defaults to its size; dp=-1 means world / tp).

    With ``train`` (and ``data.seq_len``) it knows the step's batch: gradient accumulation (checked
    against ``train.global_batch_size`` before any mesh is made) and tokens per step.
    """
    world_size = dist.get_world_size() if world_size is None else world_size
    dp = data_parallel_size(parallel, world_size)
    batch = {}
    if train is not None:
        batch = dict(grad_accum_steps=grad_accum_steps(train, dp), micro_batch_size=train.micro_batch_size,
                     seq_len=seq_len)
    if dp == 1:
        mesh = init_device_mesh(device_type, (parallel.tp,), mesh_dim_names=("tp",))
    else:
        mesh = init_device_mesh(device_type, (dp, parallel.tp), mesh_dim_names=("dp", "tp"))
    return replace(layout_of(mesh, parallel), **batch)


def run_layout(cfg: Config, device_type: str) -> ParallelLayout:
    """The layout of a training run: ``parallel`` over the process group, the batch of ``train`` and ``data``."""
    return build_layout(cfg.parallel, device_type, train=cfg.train, seq_len=cfg.data.seq_len)


def decoding_layout(device_type: str) -> ParallelLayout:
    """Every rank of the process group in one tp group, without sequence parallelism (decoding goes one
    token at a time) and with whole logits (every rank samples from them)."""
    parallel = ParallelConfig(tp=dist.get_world_size(), dp=1, sequence_parallel=False, loss_parallel=False)
    return build_layout(parallel, device_type)


def layout_of(mesh: DeviceMesh, parallel: ParallelConfig) -> ParallelLayout:
    """The layout of an existing mesh with dims ("tp",) or ("dp", "tp"); its sizes override ``parallel``'s."""
    if mesh.mesh_dim_names not in (("tp",), ("dp", "tp")):
        raise ValueError(f"a layout's mesh has dims ('tp',) or ('dp', 'tp'), not {mesh.mesh_dim_names}")
    dp = mesh["dp"].size() if mesh.ndim == 2 else 1
    tp = mesh["tp"].size() if mesh.ndim == 2 else mesh.size()
    return ParallelLayout(mesh, replace(parallel, dp=dp, tp=tp), dist.get_rank(), mesh.size(),
                          mesh.get_local_rank("dp") if dp > 1 else 0, mesh.get_local_rank("tp"))


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly distributed tensor (a no-op for plain tensors)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def any_rank(flags: list[bool], device: torch.device, group=None) -> list[bool]:
    """Each flag true on every rank if it is true on any rank (one all-reduce over ``group``, whose
    tensors live on ``device``): shared decisions."""
    if not dist.is_initialized():
        return list(flags)
    values = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in values.tolist()]


def raise_on_every_rank(failure: Exception | None, error: type[Exception], what: str, device: torch.device,
                        group=None) -> None:
    """Raise ``failure`` here, and on the ranks of ``group`` without one an ``error`` carrying the lowest
    failing rank's message (``what`` names what failed there). Every rank calls it once all agreed
    that one failed: nobody is left waiting in a collective."""
    if not dist.is_initialized():
        raise failure
    world = dist.get_world_size(group)
    first = torch.tensor([dist.get_rank(group) if failure is not None else world], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    source = int(first.item())
    reason = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(reason, group=group, group_src=source)
    if failure is not None:
        raise failure
    raise error(f"{what} of rank {source} failed: {reason[0]}")


def host_group():
    """A group of every rank whose collectives work on host memory (gloo), for decisions all ranks
    share between steps (stop, end of data): taken there, they make the host wait for no device.
    The default group when it is gloo already; collective: every rank calls it, in the same order."""
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: GPUs, and CPUs with native bf16 (AVX-512 BF16, AMX).
    Elsewhere a CPU's bf16 matmul is emulated and several times slower than fp32."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def dtype_named(name: str, device: torch.device) -> torch.dtype:
    """``bf16``, ``fp32``, or ``auto``: bf16 where it is native on ``device``, else fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return DTYPES[name]


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in (``train.dtype``); master weights stay fp32."""
    return dtype_named(cfg.train.dtype, device)


def resolve_auto_dtype(cfg: Config, device: torch.device) -> Config:
    """``train.dtype = "auto"`` decided once, on rank 0, for every rank (and so stored in checkpoints)."""
    if cfg.train.dtype != "auto":
        return cfg
    decision = ["bf16" if compute_dtype(cfg, device) == torch.bfloat16 else "fp32"]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    log.info(f"train.dtype=auto: {decision[0]} on this {device.type}")
    return replace(cfg, train=replace(cfg.train, dtype=decision[0]))


def mixed_precision(dtype: torch.dtype, device: torch.device):
    """bf16 autocast over the fp32 master weights, or nothing where the compute dtype is fp32."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

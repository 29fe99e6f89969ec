"""The training loop: wires config, mesh, model, data, optimizer, checkpoints, metrics and signals."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from .checkpoint import CheckpointError, Checkpointer, ModelOptimizerState, config_changes, resolve_checkpoint
from .config import Config, ConfigError, DataConfig, validate
from .data import SharePlan, TensorParallelBatches, build_data_loader, data_files, shared_plan
from .generate import SamplingConfig, generate_text
from .metrics import LogWindow, MetricsLogger, ProgressReporter, peak_flops, peak_memory_gib, progress_text
from .model import ArgonneModel
from .optim import build_optimizer, build_scheduler, clip_grad_norm_
from .parallelize import build_mesh, full_value, loss_context, materialize, mesh_dim, parallelize

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


class StopSignals:
    """SIGTERM / SIGUSR1 / SIGINT ask for a stop at the next step boundary; a second one acts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop waiting for the step boundary
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def init_distributed() -> tuple[torch.device, str]:
    """Join the torchrun process group (or make a group of one); cuda + nccl when GPUs exist."""
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python launch/train_dt.py`: a world of one
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend)
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return device, dist.get_backend()


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: GPUs, and CPUs with native bf16 (AVX-512 BF16, AMX).
    Elsewhere a CPU's bf16 matmul is emulated and several times slower than fp32."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in (``train.dtype``; ``auto``: bf16 where it is native); master weights stay fp32."""
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and native_bf16(device))
    return torch.bfloat16 if bf16 else torch.float32


def resolve_auto_dtype(cfg: Config, device: torch.device) -> Config:
    """``train.dtype = "auto"`` decided once, on rank 0, for every rank (and so stored in checkpoints)."""
    if cfg.train.dtype != "auto":
        return cfg
    decision = ["bf16" if compute_dtype(cfg, device) == torch.bfloat16 else "fp32"]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"train.dtype=auto: {decision[0]} on this {device.type}", flush=True)
    return replace(cfg, train=replace(cfg.train, dtype=decision[0]))


def build_model(cfg: Config, mesh, device: torch.device) -> ArgonneModel:
    """Meta-device model -> tensor parallel -> materialized shard by shard -> FSDP2."""
    with torch.device("meta"):
        model = ArgonneModel(cfg.model)
    return parallelize(model, mesh, cfg.parallel, compute_dtype(cfg, device),
                       before_fsdp=partial(materialize, device=device, seed=cfg.train.seed))


def mixed_precision(cfg: Config, device: torch.device):
    """bf16 autocast over the fp32 master weights, or nothing where the compute dtype is fp32."""
    if compute_dtype(cfg, device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_reduce_max(flags: list[bool], device: torch.device) -> list[bool]:
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def accumulate_gradients(model, micro_batches: list[dict], device: torch.device, autocast) -> torch.Tensor:
    """Forward + backward over the micro-batches; returns this rank's summed loss / micro-batches.

    Under FSDP2 the gradients are reduce-scattered once, after the last micro-batch: the earlier
    ones accumulate in the unsharded gradients.
    """
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(index == len(micro_batches) - 1)
        inputs, targets = batch["input"].to(device), batch["target"].to(device)
        with autocast, loss_context(model):
            loss = model(inputs, targets=targets) / len(micro_batches)
            loss.backward()
        loss_sum += full_value(loss.detach())
    return loss_sum


def train_step(model, optimizer, micro_batches: list[dict], device: torch.device, autocast, grad_clip: float):
    """Forward + backward over the micro-batches, global-norm clip, optimizer step unless non-finite.

    Returns (loss averaged over micro-batches and dp ranks, gradient norm, whether the step was
    applied). Every rank gets the same numbers, so all take the same decision.
    """
    loss_sum = accumulate_gradients(model, micro_batches, device, autocast)
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip).item()
    # Every tp rank holds its dp group's loss, so the sum over the world is tp x the sum over dp
    # ranks, and the mean over dp ranks is that sum / world.
    dist.all_reduce(loss_sum)
    mean_loss = loss_sum.item() / dist.get_world_size()
    finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, finite


@torch.no_grad()
def evaluate(model, batches, device: torch.device, autocast, max_batches: int = 0, source: str = "",
             progress: ProgressReporter | None = None) -> dict:
    """Mean next-token loss (and perplexity) over ``max_batches`` batches (0: all of them).

    Under data parallelism every rank must run the same number of batches, and the mean is taken
    over all ranks' batches.
    """
    total = torch.zeros(2, device=device)  # loss sum, batch count
    for index, batch in enumerate(batches):
        if max_batches and index >= max_batches:
            break
        with autocast, loss_context(model):
            loss = model(batch["input"].to(device), targets=batch["target"].to(device))
        total[0] += full_value(loss)
        total[1] += 1
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.finish()
    if dist.is_initialized():
        dist.all_reduce(total)  # tp ranks repeat their dp group's numbers: the ratio is unchanged
    if total[1] == 0:
        raise ValueError(f"validation data {source} yielded no batch: too little text for one batch of "
                         "micro_batch_size x (seq_len + 1) tokens")
    mean = (total[0] / total[1]).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}


def samples(model, cfg: Config, autocast) -> list[str]:
    """Greedy continuations of ``metrics.sample_prompts`` by the model being trained.

    Full recomputation per token (no KV cache), the sequence padded on the right to a multiple of
    the TP degree: sequence parallelism shards the sequence, so decode steps of one token are not
    possible; causal attention makes the padding invisible.
    """
    sp = cfg.parallel.sequence_parallel and cfg.parallel.tp > 1
    greedy = SamplingConfig(max_new_tokens=cfg.metrics.sample_tokens, temperature=0)
    with autocast:
        return generate_text(model, cfg.data, cfg.metrics.sample_prompts, greedy, recompute=True,
                             pad_multiple=cfg.parallel.tp if sp else 1)


def train(cfg: Config, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the job described by ``cfg``; returns status, final step and per-step losses.

    ``on_step(step, record)`` is called on every rank after each optimizer step.
    """
    device, _ = init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    validate(cfg, world_size=world)
    cfg = resolve_auto_dtype(cfg, device)
    torch.manual_seed(cfg.train.seed + rank)
    mesh = build_mesh(cfg.parallel, world, device.type)
    dp_mesh = mesh_dim(mesh, "dp")
    dp_rank, dp_size = (dp_mesh.get_local_rank(), dp_mesh.size()) if dp_mesh is not None else (0, 1)
    job_dir = Path(cfg.job.dir)
    if cfg.train.eval_every and cfg.train.eval_batches == 0 and dp_size > 1:
        raise ConfigError(f"train.eval_batches=0 (the whole held-out set) needs dp 1, not {dp_size}: dp ranks "
                          "would run different numbers of batches; set train.eval_batches")

    # Each plan is made once and shared: every rank agrees on the shares, and a layout that cannot
    # work (a rank without rows, held-out data included) stops the run here, not hours in.
    plan = shared_plan(data_files(cfg.data.paths), dp_size, cfg.data)
    eval_cfg = replace(cfg.data, paths=cfg.data.eval_paths, loop=cfg.train.eval_batches > 0)
    eval_plan = (shared_plan(data_files(eval_cfg.paths, held_out=True), dp_size, eval_cfg, "data.eval_paths")
                 if cfg.train.eval_every else None)
    tp_mesh = mesh_dim(mesh, "tp")
    tp_group = tp_mesh.get_group() if tp_mesh is not None and tp_mesh.size() > 1 else None
    reads_data = tp_group is None or tp_mesh.get_local_rank() == 0

    def batches_of(data_cfg: DataConfig, data_plan: SharePlan) -> TensorParallelBatches:
        loader = build_data_loader(data_cfg, cfg.train.micro_batch_size, dp_rank, dp_size, plan=data_plan) if reads_data else None
        return TensorParallelBatches(loader, tp_group)

    model = build_model(cfg, mesh, device)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    data = batches_of(cfg.data, plan)
    # Asynchronous saves run their collectives in a background thread, beside training's: they need
    # a process group of their own (gloo: the data being written is on the CPU by then).
    ckpt_group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save else None
    checkpointer = Checkpointer(job_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.async_save, ckpt_group)
    train_state = ModelOptimizerState(model, optimizer)
    progress = Progress()
    data_key, rng_key = f"data.dp_rank_{dp_rank}", f"rng.rank_{rank}"

    latest = checkpointer.latest()
    if latest is not None:
        changes = config_changes(latest, cfg)
        if changes and rank == 0:
            print(f"resuming {latest} with changed settings: " + "; ".join(changes), flush=True)
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        extras = checkpointer.load(latest, train_state, ["progress", data_key, rng_key])
        for group, values in zip(optimizer.param_groups, configured):
            group.update(values)  # this config's weight decay, betas, eps; not the checkpoint's
        progress = Progress(**extras["progress"])
        if data.reads:
            if data_key not in extras:
                raise CheckpointError(f"{latest}: no data position for dp rank {dp_rank} (it was saved with fewer dp ranks)")
            data.load_state_dict(extras[data_key])
        if rng_key in extras:
            _set_rng_state(extras[rng_key], device)
    elif cfg.checkpoint.initial_load_path:
        initial = resolve_checkpoint(cfg.checkpoint.initial_load_path)
        config_changes(initial, cfg)  # refuses model settings the weights were not trained with
        checkpointer.load(initial, ModelOptimizerState(model, None), [])
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps, start_step=progress.step)

    def save() -> Path:
        extras = {"progress": asdict(progress), rng_key: _rng_state(device)}
        if data.reads:
            extras[data_key] = data.state_dict()
        return checkpointer.save(progress.step, train_state, extras, cfg.to_dict())

    # Steps past the checkpoint (logged before a crash) are dropped: after a resume each appears once.
    metrics = MetricsLogger(job_dir, cfg.metrics.tensorboard, enabled=rank == 0, resume_step=progress.step)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    peak = peak_flops(device, compute_dtype(cfg, device)) * world
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * dp_size
    autocast = mixed_precision(cfg, device)
    signals = StopSignals()
    batches = iter(data)
    losses: dict[int, float] = {}
    status, last_saved, saved_step = "completed", None, -1
    window, started = LogWindow(), time.perf_counter()
    try:
        while progress.step < cfg.train.steps:
            micro_batches, out_of_data = [], False
            try:
                micro_batches = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
            except StopIteration:
                out_of_data = True
            if not cfg.data.loop and _all_reduce_max([out_of_data], device)[0]:
                status = "data_exhausted"
                break

            mean_loss, grad_norm, finite = train_step(model, optimizer, micro_batches, device, autocast, cfg.optim.grad_clip)
            if finite:
                progress.consecutive_nonfinite = 0
            else:
                progress.skipped_steps += 1
                progress.consecutive_nonfinite += 1
                if rank == 0:
                    print(f"step {progress.step + 1}: non-finite loss {mean_loss} / grad norm "
                          f"{grad_norm}: update skipped", flush=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            progress.step += 1
            progress.tokens_seen += tokens_per_step
            losses[progress.step] = mean_loss
            checkpointer.poll(device)
            if progress.consecutive_nonfinite > cfg.train.max_nonfinite_steps:
                newest = checkpointer.latest()
                raise TrainingError(
                    f"{progress.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient norm "
                    f"(up to step {progress.step}; train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                    f"the last good checkpoint is {newest or 'none yet'}"
                )

            window.add(mean_loss, grad_norm)
            record = {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": progress.tokens_seen}
            if progress.step % cfg.metrics.log_every == 0 or progress.step == cfg.train.steps:
                # Means over the steps since the previous line (Megatron's convention): a smooth curve.
                seconds_per_step = window.seconds_per_step()
                tokens_per_s = tokens_per_step / seconds_per_step
                metrics.log(progress.step, {
                    **window.means(), "lr": lr, "tokens_seen": progress.tokens_seen,
                    "tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / world,
                    "mfu": flops_per_token * tokens_per_s / peak, "memory_gib": peak_memory_gib(device),
                    "skipped_steps": progress.skipped_steps,
                    **{f"docs_dropped_{k}": v for k, v in micro_batches[-1]["dropped"].items()},
                }, head=progress_text(progress.step, cfg.train.steps, time.perf_counter() - started, seconds_per_step))
                window.reset()
            if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0:
                # A fresh loader each time: every evaluation sees the same batches.
                result = evaluate(model, batches_of(eval_cfg, eval_plan), device, autocast, cfg.train.eval_batches,
                                  source=f"data.eval_paths={cfg.data.eval_paths}")
                metrics.log(progress.step, {**{f"eval_{k}": v for k, v in result.items()},
                                            "tokens_seen": progress.tokens_seen}, section="eval")
                record.update({f"eval_{k}": v for k, v in result.items()})
            if cfg.metrics.sample_every and progress.step % cfg.metrics.sample_every == 0:
                for prompt, text in zip(cfg.metrics.sample_prompts, samples(model, cfg, autocast)):
                    metrics.text(progress.step, "sample", prompt + text)
            if on_step is not None:
                on_step(progress.step, record)

            stop = _all_reduce_max([signals.requested], device)[0]
            every = cfg.checkpoint.every
            periodic = every and progress.step % every == 0 and progress.consecutive_nonfinite == 0
            if stop or periodic or progress.step == cfg.train.steps:
                last_saved, saved_step = save(), progress.step
            if stop:
                status = "preempted"
                break
        if saved_step != progress.step:
            last_saved = save()
        checkpointer.wait()
    finally:
        signals.restore()
        metrics.close()
    if rank == 0:
        print(f"{status} at step {progress.step}; checkpoint {last_saved}", flush=True)
    return {"status": status, "step": progress.step, "losses": losses, "checkpoint": str(last_saved),
            "skipped_steps": progress.skipped_steps}


def evaluate_checkpoint(checkpoint: str, data_paths: list[str], max_batches: int = 0,
                        micro_batch_size: int | None = None) -> dict:
    """Validation loss and perplexity of a checkpoint on held-out parquet data (one process)."""
    from .checkpoint import load_model

    model, cfg = load_model(checkpoint)
    data_cfg = replace(cfg.data, paths=data_paths, loop=max_batches > 0)
    batches = build_data_loader(data_cfg, micro_batch_size or cfg.train.micro_batch_size)
    autocast = mixed_precision(cfg, torch.device("cpu"))
    progress = ProgressReporter(max_batches or None, f"evaluating {checkpoint}", "batches")
    return evaluate(model, batches, torch.device("cpu"), autocast, max_batches, source=str(data_paths), progress=progress)

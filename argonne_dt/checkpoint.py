"""Checkpoints with torch.distributed.checkpoint: complete-or-invisible, retention, resharding.

Layout under ``job.dir/checkpoints``::

    step-00000100/        a complete checkpoint (DCP files + .metadata + config.json)
    step-00000200.tmp/    a save in progress, or one a crash interrupted: never loaded, removed

Every rank writes its own shards into ``step-N.tmp``; DCP writes ``.metadata`` only after all
ranks have written; then rank 0 renames the directory to ``step-N``. A kill at any moment leaves
either the previous checkpoints alone or a new complete one. Loading goes through DCP's
resharding, so a checkpoint saved at one TP / dp layout loads into another.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.torch_version import TorchVersion
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from .config import Config, config_from_dict, with_added_keys
from .metrics import logger

log = logger(__name__)
# Before torch 2.13 a DefaultStager frees its host buffers after every stage: there it serves one save.
REUSABLE_STAGER = TorchVersion(torch.__version__) >= "2.13"
_STEP_DIR = re.compile(r"step-(\d+)")
_EXTRA = "extra."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run; the message says why and what differs."""


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and (p / ".metadata").exists()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete one in a run directory or checkpoints directory."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"{path}: no complete checkpoint here (expected .metadata, or checkpoints/step-N/)")


class ModelOptimizerState(Stateful):
    """Model and optimizer state through the distributed state-dict API (DTensor / FSDP aware).

    Loading keeps this run's optimizer hyper-parameters (weight decay, betas, eps): a resumed run
    follows the config it is started with; only the moments and step counts come from the file.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
            return
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)


class CheckpointState(Protocol):
    """What the checkpointer saves beside the model: a flat dict of picklable entries.

    A state that differs by rank keys its entries by rank (``dp_rank_K``); loading receives every
    entry the checkpoint holds under the state's name, from all ranks that wrote one.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, entries: dict[str, Any]) -> None: ...


class RngState:
    """Every rank's random-number generator states (CPU, and CUDA on GPUs), keyed by global rank.

    Resumed on fewer ranks, the states of ranks that no longer exist are dropped (with a notice);
    on more, each new rank seeds its generators from ``seed``, its rank and the resumed step.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, seed: int, step: Callable[[], int]):
        self.rank, self.world_size, self.device, self.seed, self.step = rank, world_size, device, seed, step

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return {f"rank_{self.rank}": state}

    def load_state_dict(self, entries: dict[str, Any]) -> None:
        saved = {int(key.removeprefix("rank_")) for key in entries}
        dropped = sorted(rank for rank in saved if rank >= self.world_size)
        new = [rank for rank in range(self.world_size) if rank not in saved]
        if dropped:
            log.info(f"RNG states of ranks {dropped} dropped: the checkpoint was written by {len(saved)} ranks, "
                     f"this run has {self.world_size}")
        if new:
            log.info(f"ranks {new} have no saved RNG state: seeded from train.seed, the rank and the step")
        state = entries.get(f"rank_{self.rank}")
        if state is None:
            torch.manual_seed(self.seed + 1_000_003 * self.step() + self.rank)
            return
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def _check_model_shapes(metadata, model: torch.nn.Module, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    stored = {k.split(".", 2)[-1]: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
              if k.startswith("train.model.") and hasattr(m, "size")}
    differing = [f"{k}: checkpoint {stored.get(k)} vs model {shape}" for k, shape in expected.items() if stored.get(k) != shape]
    if differing:
        raise CheckpointError(
            f"{path}: the checkpoint's model does not match this config ({len(differing)} tensors differ): "
            + "; ".join(differing[:6])
        )


class Checkpointer:
    """Saves and restores everything that changes during training (rank-aware, DCP-based), and
    decides what a run starts from (``load``) and when it saves (``maybe_save``).

    It is given the run's state once: the model and optimizer (``ModelOptimizerState``, sharded
    by DCP) and named ``states`` (progress, data position, RNG), whose entries are stored as
    opaque pickled leaves ``extra.<name>.<key>``. Entries the same on every rank are written
    once; per-rank entries carry the rank in their key, so every rank's is kept. ``config`` (the
    run's) gives the resume and save policy and is stored beside every checkpoint (``for_run``).
    """

    def __init__(self, root: str | Path, keep_last: int, async_save: bool, model_state: ModelOptimizerState,
                 states: dict[str, CheckpointState], process_group=None, write_threads: int = 1,
                 config: Config | None = None):
        self.root = Path(root)
        self.config = config
        self.last_saved: Path | None = None
        self._saved_step = -1
        self.model_state, self.states = model_state, states
        self.keep_last = keep_last
        self.async_save = async_save
        self.process_group = process_group
        self.write_threads = write_threads
        # One stager for the run: its host buffers (pinned on GPUs) are allocated at the first save
        # and reused by every later one; close() frees them.
        self._stager = DefaultStager(staging_options()) if async_save and REUSABLE_STAGER else None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._pending: tuple[Future, Path, Path] | None = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):  # interrupted saves of an earlier process
                log.warning("removing incomplete checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    @classmethod
    def for_run(cls, cfg: Config, model_state: ModelOptimizerState, states: dict[str, CheckpointState]) -> Checkpointer:
        """The checkpointer of the run ``cfg`` (under ``job.dir/checkpoints``, with ``checkpoint.*``)."""
        # Asynchronous saves run their collectives in a background thread, beside training's: they
        # need a process group of their own (gloo: the data being written is on the CPU by then).
        group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save else None
        settings = cfg.checkpoint
        return cls(Path(cfg.job.dir) / "checkpoints", settings.keep_last, settings.async_save, model_state, states,
                   group, settings.write_threads, config=cfg)

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load(self) -> Path | None:
        """What the run starts from: its newest complete checkpoint (everything; settings changed since are
        named, model values the weights depend on refused), else the weights of ``checkpoint.initial_load_path``,
        else nothing (None)."""
        self._require_run_config("load")
        latest = self.latest()
        if latest is not None:
            changes = config_changes(latest, self.config)
            if changes:
                log.info(f"resuming {latest} with changed settings: " + "; ".join(changes))
            self.restore(latest)
            return latest
        if self.config.checkpoint.initial_load_path:
            initial = resolve_checkpoint(self.config.checkpoint.initial_load_path)
            # Refuses model settings the weights were not trained with; a new run may hold out other rows.
            config_changes(initial, self.config, resuming=False)
            load_checkpoint(initial, ModelOptimizerState(self.model_state.model, None), self.process_group)
            return initial
        return None

    def maybe_save(self, step: int, last: bool = False, force: bool = False, healthy: bool = True) -> Path | None:
        """Save step ``step`` when ``force`` (a stop, the end of a run), at the ``last`` step, or every
        ``checkpoint.every`` steps while ``healthy`` (not amid non-finite steps); a step saved already is
        not saved again. Returns the directory saved to, or None."""
        self._require_run_config("maybe_save")
        every = self.config.checkpoint.every
        periodic = every and step % every == 0 and healthy
        if not (force or last or periodic) or step == self._saved_step:
            return None
        self.last_saved = self.save(step, self.config.to_dict())
        self._saved_step = step
        return self.last_saved

    def _require_run_config(self, what: str) -> None:
        if self.config is None:
            raise ValueError(f"Checkpointer.{what} follows the run's settings: make the checkpointer with "
                             "Checkpointer.for_run(cfg, ...) (one made without a config only saves and restores)")

    def save(self, step: int, config: dict) -> Path:
        """Write step ``step`` (unless a complete checkpoint of it exists); returns its directory.

        A complete checkpoint is never removed before its replacement is: the same step saved
        again (a finished run restarted, a stop right after a periodic save) keeps the one on disk.
        """
        self.wait()
        final = self.root / f"step-{step:08d}"
        # Rank 0's view of the file system decides for every rank: a save is collective.
        complete = [(final / ".metadata").exists()]
        if dist.is_initialized():
            dist.broadcast_object_list(complete, src=0)
        if complete[0]:
            log.info("step %d is already saved: %s", step, final)
            return final
        # Pickled, an extra is one leaf for DCP whatever its nesting, so loading needs no template.
        state: dict[str, Any] = {"train": self.model_state}
        for name, stateful in self.states.items():
            state.update({f"{_EXTRA}{name}.{key}": pickle.dumps(value) for key, value in stateful.state_dict().items()})
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)  # never complete (no .metadata): nothing to lose
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if dist.is_initialized():
            dist.barrier()
        writer = dcp.FileSystemWriter(str(tmp), thread_count=self.write_threads)
        if self.async_save:
            # Returns once the state is copied to host memory; the files are written in the background.
            stager = self._stager or DefaultStager(staging_options())
            future = dcp.async_save(state, storage_writer=writer, process_group=self.process_group,
                                    async_stager=stager)
            if stager is not self._stager:
                future.add_done_callback(lambda _: stager.close())
            self._pending = (future, tmp, final)
        else:
            dcp.save(state, storage_writer=writer, process_group=self.process_group)
            self._publish(tmp, final)
        return final

    def poll(self, device: torch.device) -> None:
        """Publish a finished asynchronous save (call once per step, on every rank).

        Ranks finish writing at different moments; they agree (one tiny all-reduce on the
        default group, only while a save is pending) so that all publish at the same step.
        """
        if self._pending is None:
            return
        done = torch.tensor([float(self._pending[0].done())], device=device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() == 1.0:
            self.wait()

    def wait(self) -> None:
        """Block until an asynchronous save is written and published."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        # async_save completes per rank; publishing needs every rank's files written.
        if dist.is_initialized():
            dist.barrier()
        self._publish(tmp, final)

    def close(self) -> None:
        """Finish a pending save and free the stager's host buffers (the end of a run)."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def _publish(self, tmp: Path, final: Path) -> None:
        if self.rank == 0:
            tmp.rename(final)
            log.info("checkpoint saved: %s", final)
            if self.keep_last > 0:
                for old in complete_checkpoints(self.root)[: -self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)

    def restore(self, path: Path) -> None:
        """Load the model, optimizer and every state from ``path`` (DCP reshards the tensors)."""
        extras = load_checkpoint(path, self.model_state, self.process_group, with_extras=True)
        for name, stateful in self.states.items():
            prefix = name + "."
            try:
                stateful.load_state_dict({k[len(prefix):]: v for k, v in extras.items() if k.startswith(prefix)})
            except (RuntimeError, ValueError) as err:  # e.g. a data position that no longer fits data.paths
                raise CheckpointError(f"{path}: cannot restore its {name} state: {err}") from err


def staging_options() -> StagingOptions:
    """How an asynchronous save copies the state to host memory: on GPUs into pinned buffers with
    non-blocking copies (several times faster than pageable ones). The copy finishes before the save
    returns (no background staging), so the next optimizer step cannot change a tensor mid-copy."""
    cuda = torch.cuda.is_available()
    return StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                          use_non_blocking_copy=cuda)


def load_checkpoint(path: Path, train_state: ModelOptimizerState, process_group=None,
                    with_extras: bool = False) -> dict[str, Any]:
    """Load model (+ optimizer) in place; with ``with_extras``, return every extra entry of the checkpoint.

    Works without a process group too (one process reading a checkpoint written by many: DCP
    reshards).
    """
    distributed = dist.is_initialized()
    started = time.perf_counter()
    log.info(f"loading checkpoint {path} ...")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    _check_model_shapes(metadata, train_state.model, path)
    wanted: dict[str, Any] = {"train": train_state}
    if with_extras:
        wanted.update({k: b"" for k in metadata.state_dict_metadata if k.startswith(_EXTRA)})
    try:
        with warnings.catch_warnings():  # DCP warns that one process reads alone: intended here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, checkpoint_id=str(path), process_group=process_group, no_dist=not distributed)
    except dcp.CheckpointException as err:
        raise CheckpointError(f"{path}: cannot load: {err}") from err
    log.info(f"loaded checkpoint {path} in {time.perf_counter() - started:.1f} s")
    return {k[len(_EXTRA):]: pickle.loads(v) for k, v in wanted.items() if k.startswith(_EXTRA)}


# Model settings that do not change a tensor's shape but that the trained weights depend on.
_FIXED_BY_WEIGHTS = ("rope_theta", "norm_eps", "num_heads", "num_kv_heads", "head_dim")


def config_changes(path: Path, cfg: Config, resuming: bool = True) -> list[str]:
    """``section.key: old -> new`` for every value of ``cfg`` that differs from the checkpoint's config.json.

    A run may change its optimizer, schedule, data or logging when it resumes; a change of a model
    value the weights were trained with (RoPE base, norm epsilon, the head split) is refused; so is,
    when ``resuming`` (the run continues its data position, not only its weights), a change of
    data.eval_split, which would move the cut between training and held-out rows.
    """
    source = Path(path) / "config.json"
    if not source.exists():
        return []
    stored = with_added_keys(json.loads(source.read_text()))
    changes = [(f"{section}.{key}", stored[section][key], value)
               for section, values in cfg.to_dict().items() if section in stored
               for key, value in values.items() if key in stored[section] and stored[section][key] != value]
    for key, old, new in changes:
        if key.removeprefix("model.") in _FIXED_BY_WEIGHTS:
            raise CheckpointError(
                f"{key} is {new!r} in this config but {old!r} in {source}: the checkpoint's weights were "
                f"trained with {old!r}; set {key}={old!r} to continue from it, or start a new run"
            )
        if key == "data.eval_split" and resuming:
            raise CheckpointError(
                f"data.eval_split is {new!r} in this config but {old!r} in {source}: another split would hold out "
                f"rows the run has trained on, or train on held-out ones; set --data.eval_split={old!r} to resume, "
                "or start a new run (another job.dir; checkpoint.initial_load_path keeps the weights)"
            )
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in changes]


def stored_config(path: Path) -> Config:
    """The resolved run config saved with a checkpoint."""
    source = Path(path) / "config.json"
    if not source.exists():
        raise CheckpointError(f"{source} is missing: not a checkpoint written by argonne_dt")
    return config_from_dict(json.loads(source.read_text()))


def write_model_checkpoint(model: torch.nn.Module, cfg: Config, out_dir: str | Path) -> Path:
    """A weights-only checkpoint from one process (for ``checkpoint.initial_load_path`` and loading)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"train": ModelOptimizerState(model, None)}, checkpoint_id=str(tmp), no_dist=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out

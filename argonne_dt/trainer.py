"""The training run: a ``Trainer`` holds what the run is made of, ``train`` is its loop.

    trainer = Trainer(cfg)          # layout, plans, model, optimizer, data, checkpointer, metrics; resumes
    trainer.run()                   # steps until train.steps, a stop signal, or the end of the data

A second objective (e.g. distillation) is a different objective factory for the same loop.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .checkpoint import Checkpointer, ModelOptimizerState, RngState
from .config import Config, check_job, validate
from .data import DataError, batches_for
from .distributed import (ParallelLayout, any_rank, compute_dtype, host_group, init_distributed, mixed_precision,
                          raise_on_every_rank, resolve_auto_dtype, run_layout)
from .downstream import MultipleChoiceTask
from .evaluation import Evaluator
from .generate import SamplingConfig, generate_text
from .loss import next_token_loss
from .metrics import EVERY_RANK, LogWindow, MetricsLogger, is_rank_zero, logger, peak_flops, peak_memory_gib, progress_text
from .optim import build_optimizer, build_scheduler
from .parallelize import ModelTransforms, build_model
from .step import Objective, StepResult, train_step

HOST = torch.device("cpu")  # where the tensors of the host group's decisions live


# Makes a run's objective once its layout and device are known: (objective, FLOPs per token it adds
# to the model's forward and backward, for MFU).
ObjectiveFactory = Callable[[ParallelLayout, torch.device], tuple[Objective, float]]


def pretraining(layout: ParallelLayout, device: torch.device) -> tuple[Objective, float]:
    """The pretraining objective: next-token cross-entropy, nothing beside the model."""
    return next_token_loss, 0.0


log = logger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


@dataclass
class Progress:
    """The counters of a run; checkpointed (the same on every rank, so written once)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, entries: dict) -> None:
        for key, value in entries.items():
            setattr(self, key, value)


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
        log.info(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step", extra=EVERY_RANK)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    """Everything a run is made of, built once and resumed from the run's newest checkpoint."""

    def __init__(self, cfg: Config, objective_factory: ObjectiveFactory = pretraining):
        self.device = init_distributed(cfg.parallel.timeout_minutes)
        self.layout = layout = run_layout(cfg, self.device.type)
        validate(cfg, dp=layout.dp)
        self.cfg = cfg = resolve_auto_dtype(cfg, self.device)
        torch.manual_seed(cfg.train.seed + layout.rank)
        # The data plans its shares once for all ranks: a layout that cannot work (a rank without
        # rows, held-out data included) stops the run here, not hours in.
        self.data = batches_for(cfg.data, cfg.train.micro_batch_size, layout)
        dtype = compute_dtype(cfg, self.device)
        self.autocast = mixed_precision(dtype, self.device)
        self.evaluator = Evaluator.for_run(cfg, self.device, self.autocast, layout) if cfg.train.eval_every else None
        self.downstream = MultipleChoiceTask.for_run(cfg) if cfg.train.downstream_every else None
        self.model = build_model(cfg.model, layout, self.device, cfg.train.seed, dtype,
                                 transforms=ModelTransforms.of(cfg.parallel))
        self.model.use_loss_path(fused_chunk=cfg.train.loss_chunk_tokens)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type)
        # Before the resume and the logs: a teacher that cannot load stops the run with nothing opened.
        self.objective, objective_flops = objective_factory(layout, self.device)
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len) + objective_flops
        self.progress = Progress()
        self.window = LogWindow()
        self.host_group = host_group()
        self.checkpointer = Checkpointer.for_run(
            cfg, ModelOptimizerState(self.model, self.optimizer),
            {"progress": self.progress, "data": self.data, "log_window": self.window,
             "rng": RngState(layout.rank, layout.world_size, self.device, cfg.train.seed, lambda: self.progress.step)})
        self.checkpointer.load()
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps, start_step=self.progress.step)
        # Steps past the checkpoint (logged before a crash) are dropped: after a resume each appears once.
        self.metrics = MetricsLogger(cfg.job.dir, cfg.metrics.tensorboard, enabled=is_rank_zero(),
                                     resume_step=self.progress.step)
        self.peak_flops = peak_flops(self.device, dtype) * layout.world_size
        self.losses: dict[int, float] = {}
        self.started = time.perf_counter()

    def next_micro_batches(self) -> list[dict] | None:
        """The next step's micro-batches; None on every rank once any rank's data ended (``data.loop``
        false). An exception of any rank's data is raised on every rank, with that rank's message.
        Agreed over the host group: no wait for a device."""
        batches, ended, failure = [], False, None
        try:
            batches = [next(self.batches) for _ in range(self.layout.grad_accum_steps)]
        except StopIteration:
            ended = True
        except Exception as err:
            failure = err
        ended, failed = any_rank([ended, failure is not None], HOST, self.host_group)
        if failed:
            raise_on_every_rank(failure, DataError, "the training data", HOST, self.host_group)
        return None if ended else batches

    def step(self, micro_batches: list[dict]) -> StepResult:
        """One optimizer step and the counters, schedule and checkpoint publishing that follow it."""
        cfg, progress = self.cfg, self.progress
        result = train_step(self.model, self.optimizer, micro_batches, self.device, self.autocast,
                            cfg.optim.grad_clip, self.layout, self.objective)
        if result.applied:
            progress.consecutive_nonfinite = 0
        else:
            progress.skipped_steps += 1
            progress.consecutive_nonfinite += 1
            log.info(f"step {progress.step + 1}: non-finite loss {result.losses} / grad norm "
                     f"{result.grad_norm}: update skipped")
        self.lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        progress.step += 1
        progress.tokens_seen += self.layout.tokens_per_step
        self.losses[progress.step] = result.loss
        self.checkpointer.poll(self.device)
        if progress.consecutive_nonfinite > cfg.train.max_nonfinite_steps:
            raise TrainingError(
                f"{progress.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient norm "
                f"(up to step {progress.step}; train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                f"the last good checkpoint is {self.checkpointer.latest() or 'none yet'}")
        return result

    def log(self, result: StepResult, micro_batches: list[dict]) -> dict:
        """The step's record (for ``on_step``); every ``metrics.log_every`` steps a line of the window's means."""
        step, total = self.progress.step, self.cfg.train.steps
        self.window.add(result.losses, result.grad_norm)
        record = {**result.losses, "lr": self.lr, "grad_norm": result.grad_norm, "tokens_seen": self.progress.tokens_seen}
        if step % self.cfg.metrics.log_every == 0 or step == total:
            # Means over the steps since the previous line (Megatron's convention): a smooth curve.
            seconds_per_step = self.window.seconds_per_step()
            tokens_per_s = self.layout.tokens_per_step / seconds_per_step
            self.metrics.log(step, {
                **self.window.means(), "lr": self.lr, "tokens_seen": self.progress.tokens_seen,
                "tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / self.layout.world_size,
                "mfu": self.flops_per_token * tokens_per_s / self.peak_flops, "memory_gib": peak_memory_gib(self.device),
                "skipped_steps": self.progress.skipped_steps,
                **{f"docs_dropped_{k}": v for k, v in micro_batches[-1]["dropped"].items()},
            }, head=progress_text(step, total, time.perf_counter() - self.started, seconds_per_step))
            self.window.reset()
        return record

    def evaluate_if_due(self, record: dict) -> None:
        if not self.cfg.train.eval_every or self.progress.step % self.cfg.train.eval_every:
            return
        result = {f"eval_{k}": v for k, v in self.evaluator(self.model).items()}
        self.metrics.log(self.progress.step, {**result, "tokens_seen": self.progress.tokens_seen}, section="eval")
        record.update(result)

    def downstream_if_due(self, record: dict) -> None:
        """Multiple-choice accuracy on ``train.downstream_file`` every ``train.downstream_every`` steps."""
        every = self.cfg.train.downstream_every
        if not every or self.progress.step % every:
            return
        scores = self.downstream.score(self.model, self.device, self.autocast, self.layout,
                                       self.layout.tokens_per_micro_batch)  # what a training micro-batch holds
        result = {f"downstream_{k}": v for k, v in scores.metrics().items()}
        self.metrics.log(self.progress.step, {**result, "tokens_seen": self.progress.tokens_seen}, section="downstream")
        record.update(result)

    def sample_if_due(self) -> None:
        """Greedy continuations of ``metrics.sample_prompts`` by the model being trained.

        Full recomputation per token (no KV cache), the sequence padded on the right to a multiple
        of the TP degree: sequence parallelism shards the sequence, so decode steps of one token
        are not possible; causal attention makes the padding invisible.
        """
        every = self.cfg.metrics.sample_every
        if not every or self.progress.step % every:
            return
        greedy = SamplingConfig(max_new_tokens=self.cfg.metrics.sample_tokens, temperature=0)
        prompts = self.cfg.metrics.sample_prompts
        with self.autocast:
            texts = generate_text(self.model, self.cfg.data, prompts, greedy, recompute=True,
                                  pad_multiple=self.layout.sequence_multiple)
        for prompt, text in zip(prompts, texts):
            self.metrics.text(self.progress.step, "sample", prompt + text)

    def run(self, on_step: Callable[[int, dict], None] | None = None) -> dict:
        """Train until ``train.steps``, a stop signal or the end of the data; returns status, final
        step, per-step losses and the last checkpoint. ``on_step(step, record)`` runs on every rank."""
        signals, status = StopSignals(), "completed"
        self.batches = iter(self.data)  # reads nothing: the first read and its errors come in next_micro_batches
        try:
            while self.progress.step < self.cfg.train.steps:
                micro_batches = self.next_micro_batches()
                if micro_batches is None:
                    status = "data_exhausted"
                    break
                record = self.log(self.step(micro_batches), micro_batches)
                self.evaluate_if_due(record)
                self.downstream_if_due(record)
                self.sample_if_due()
                if on_step is not None:
                    on_step(self.progress.step, record)
                stop = any_rank([signals.requested], HOST, self.host_group)[0]  # one decision for all ranks
                self.checkpointer.maybe_save(self.progress.step, last=self.progress.step == self.cfg.train.steps,
                                             force=stop, healthy=self.progress.consecutive_nonfinite == 0)
                if stop:
                    status = "preempted"
                    break
            self.checkpointer.maybe_save(self.progress.step, force=True)
            self.checkpointer.close()  # the last save written, the staging buffers freed
        finally:
            signals.restore()
            self.metrics.close()
        log.info(f"{status} at step {self.progress.step}; checkpoint {self.checkpointer.last_saved}")
        return {"status": status, "step": self.progress.step, "losses": self.losses,
                "checkpoint": str(self.checkpointer.last_saved), "skipped_steps": self.progress.skipped_steps}


def train(cfg: Config, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the job described by ``cfg``; see ``Trainer.run``. A config with a teacher is a
    distillation job (``distill.distill``), not started as pretraining by mistake."""
    check_job(cfg, distilling=False)
    return Trainer(cfg).run(on_step)

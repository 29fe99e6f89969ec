"""How often the step loop reads a tensor's value on the host: on a GPU each such read waits for the
device to finish its queued work. Counted on CPU, where every read is visible: ``.item()``,
``bool(tensor)`` and friends reach ``aten._local_scalar_dense``, a device tensor's ``.cpu()`` is a
copy to the CPU, and ``.tolist()`` / ``.numpy()`` (which skip the dispatcher on CPU tensors) are
counted where they are called."""

from __future__ import annotations

import inspect
import sys

import pytest

from helpers.documents import documents, write_parquet
from helpers.processes import run_distributed

pytestmark = pytest.mark.distributed


# Reads made inside these functions are left out:
NOT_COUNTED = {
    # DTensor's shard offsets, from the device mesh's coordinates: a CPU tensor in every run.
    "compute_local_shape_and_global_offset",
    # The check of each micro-batch's targets: it reads the host batch before its copy, and reads
    # nothing from a device tensor (``check_targets`` returns at once for those).
    "check_targets",
}


def _reads_between_steps(job_dir: str, corpus: str, overrides: dict) -> dict:
    """In each whole iteration of the loop after the first: host reads of tensor values, and the
    shared decisions the trainer takes (``any_rank``, ``raise_on_every_rank``) as ``(caller, device
    and group as they should be)``. A decision's own reads are left out of the count once it is seen
    taken on host tensors over the host group (gloo: no wait for a device)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from argonne_dt import trainer as trainer_module
    from argonne_dt.trainer import Trainer
    from helpers.runs import fail_data_at_step, make_config

    reads = {"count": 0, "in_decision": False}
    decisions: list[tuple[str, bool]] = []
    copies = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}

    def spied(decide):
        def decision(*args, **kwargs):
            given = inspect.signature(decide).bind(*args, **kwargs).arguments
            device, group = given["device"], given.get("group")
            # On a CPU run the trainer's device is a CPU too: the host's must be another object.
            on_host = device.type == "cpu" and device is not trainer.device and group is trainer.host_group
            decisions.append((sys._getframe(1).f_code.co_name, on_host))
            reads["in_decision"] = on_host
            try:
                return decide(*args, **kwargs)
            finally:
                reads["in_decision"] = False
        return decision

    def count() -> None:
        if reads["in_decision"]:
            return
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_name in NOT_COUNTED:
                return
            frame = frame.f_back
        reads["count"] += 1

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._local_scalar_dense.default:
                count()
            elif func in copies and isinstance(out, torch.Tensor) and out.device.type == "cpu" and any(
                    isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                count()
            return out

    real = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name):
        def read(self, *args, **kwargs):
            count()
            return real[name](self, *args, **kwargs)
        return read

    trainer = Trainer(make_config(job_dir, corpus, **overrides))
    fail_data_at_step(trainer, trainer.cfg.train.steps - 1)  # the error is a shared decision too
    marks: list[tuple[int, int]] = []
    for name in real:
        setattr(torch.Tensor, name, counted(name))
    real_decisions = trainer_module.any_rank, trainer_module.raise_on_every_rank
    trainer_module.any_rank, trainer_module.raise_on_every_rank = map(spied, real_decisions)
    try:
        with HostReads(), pytest.raises(UnicodeError):
            trainer.run(on_step=lambda step, record: marks.append((reads["count"], len(decisions))))
    finally:
        trainer_module.any_rank, trainer_module.raise_on_every_rank = real_decisions
        for name, method in real.items():
            setattr(torch.Tensor, name, method)
    return {"reads": [after[0] - before[0] for before, after in zip(marks, marks[1:])],
            "decisions": [decisions[before[1]:after[1]] for before, after in zip(marks, marks[1:])],
            "failing": decisions[marks[-1][1]:]}


@pytest.mark.parametrize("tp", [1, 2])
def test_the_step_loop_waits_for_the_device_once_per_step_whatever_the_micro_batches(tmp_path, tp):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_parquet(corpus / "part-0.parquet", documents(60, seed=1))
    # Three micro-batches per step. The fused AdamW of the default path: the unfused one reads each
    # parameter's step count (a host tensor: no wait for the device) every step.
    settings = {"parallel.tp": tp, "train.steps": 6, "train.grad_accum_steps": 3, "checkpoint.every": 0,
                "metrics.log_every": 2, "optim.fused": True}
    per_rank = run_distributed(_reads_between_steps, tp, str(tmp_path / "job"), str(corpus), settings)
    # Steps 2..5, logged or not, on the reading rank and its tp peer: the step's terms and gradient
    # norm in one read (which also decides whether the update is applied); none per micro-batch.
    # Between two steps two shared decisions, on the host over the host group: stop after the step,
    # then the end (or an error) of the next step's data; none per micro-batch. The data of step 6
    # fails: that error is shared on the host too.
    between_steps = [("run", True), ("next_micro_batches", True)]
    assert per_rank == [{"reads": [1, 1, 1, 1], "decisions": [between_steps] * 4,
                         "failing": between_steps + [("next_micro_batches", True)]}] * tp


def test_shared_decisions_go_through_a_gloo_group_when_the_default_group_is_not_gloo(monkeypatch):
    import torch.distributed as dist

    from argonne_dt import distributed

    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.append(kwargs) or "host")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert distributed.host_group() == "host" and made == [{"backend": "gloo"}]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.host_group() is None and len(made) == 1  # the default group serves

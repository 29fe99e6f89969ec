import pytest
import torch

from argonne_dt.checkpoint import (
    CheckpointError,
    ModelOptimizerState,
    complete_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    write_model_checkpoint,
)
from argonne_dt.config import Config
from argonne_dt.inference import load_model
from argonne_dt.model import ArgonneModel
from helpers.checkpoints import assert_restores
from helpers.models import odd_model_config


def _config(**model) -> Config:
    cfg = Config()
    cfg.model = odd_model_config(**model)
    cfg.data.seq_len = 32
    return cfg


def test_weights_round_trip_through_a_checkpoint(tmp_path):
    cfg = _config()
    model = ArgonneModel(cfg.model)
    model.init_weights(seed=4)
    path = write_model_checkpoint(model, cfg, tmp_path / "ckpt")
    loaded, stored = load_model(path)
    assert stored.model == cfg.model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded.lm_head.weight is loaded.embed.weight


def test_a_different_model_shape_is_named(tmp_path):
    cfg = _config()
    path = write_model_checkpoint(ArgonneModel(cfg.model), cfg, tmp_path / "ckpt")
    other = ArgonneModel(odd_model_config(intermediate_size=768))  # the checkpoint's MLP is 512 wide
    with pytest.raises(CheckpointError, match=r"does not match this config \(6 tensors differ\): "
                                              r"layers.0.mlp.gate_proj.weight: checkpoint \(512, 136\) vs model \(768, 136\)"):
        load_checkpoint(path, ModelOptimizerState(other, None))


def test_only_complete_checkpoints_are_found(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for name, complete in [("step-00000010", True), ("step-00000020", True), ("step-00000030.tmp", True),
                           ("step-00000040", False)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / ".metadata").write_bytes(b"")
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000010", "step-00000020"]
    assert resolve_checkpoint(tmp_path / "run").name == "step-00000020"
    assert resolve_checkpoint(root).name == "step-00000020"
    assert resolve_checkpoint(root / "step-00000010").name == "step-00000010"
    with pytest.raises(CheckpointError, match="no complete checkpoint here"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_a_complete_checkpoint_survives_a_resave_and_a_crashed_save(tmp_path, monkeypatch):
    from argonne_dt import checkpoint
    from argonne_dt.checkpoint import Checkpointer
    from argonne_dt.trainer import Progress

    cfg = _config()
    model = ArgonneModel(cfg.model)
    progress = Progress(step=2)
    saver = Checkpointer(tmp_path / "checkpoints", keep_last=0, async_save=False,
                         model_state=ModelOptimizerState(model, None), states={"progress": progress})
    first = saver.save(2, cfg.to_dict())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.dcp, "save", crash)
    # The same step again (a finished run restarted): the complete one is kept, nothing is rewritten.
    assert saver.save(2, cfg.to_dict()) == first
    progress.step = 4
    with pytest.raises(OSError, match="disk full"):
        saver.save(4, cfg.to_dict())
    assert complete_checkpoints(saver.root) == [first]
    assert_restores(first, model, step=2)


def test_resume_names_changed_settings_and_refuses_model_values_the_weights_depend_on(tmp_path):
    from argonne_dt.checkpoint import config_changes

    cfg = _config()
    path = write_model_checkpoint(ArgonneModel(cfg.model), cfg, tmp_path / "ckpt")
    cfg.optim.lr, cfg.optim.weight_decay = 5e-5, 0.05
    assert config_changes(path, cfg) == ["optim.lr: 0.0001 -> 5e-05", "optim.weight_decay: 0.1 -> 0.05"]
    cfg.model.rope_theta = 500_000.0
    with pytest.raises(CheckpointError, match=r"model.rope_theta is 500000.0 in this config but 10000.0 in .*config.json"):
        config_changes(path, cfg)


def test_rng_states_of_ranks_that_are_gone_are_dropped_and_new_ranks_seed_from_the_step(capsys):
    from argonne_dt.checkpoint import RngState

    torch.manual_seed(7)
    saved = {}
    for rank in range(4):  # a run of 4 ranks, each with its own generator state
        torch.rand(rank + 1)
        saved.update(RngState(rank, 4, torch.device("cpu"), seed=1, step=lambda: 10).state_dict())
    RngState(1, 2, torch.device("cpu"), seed=1, step=lambda: 10).load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), saved["rank_1"]["cpu"])
    RngState(0, 2, torch.device("cpu"), seed=1, step=lambda: 10).load_state_dict(saved)
    assert "RNG states of ranks [2, 3] dropped: the checkpoint was written by 4 ranks, this run has 2" in capsys.readouterr().out
    two_of_four = {key: saved[key] for key in ("rank_0", "rank_1")}
    draws = []
    for step in (10, 10, 11):
        RngState(3, 4, torch.device("cpu"), seed=1, step=lambda step=step: step).load_state_dict(two_of_four)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_ranks_new_after_a_dp_change_draw_different_numbers():
    from argonne_dt.checkpoint import RngState

    saved = {}
    for rank in range(2):  # a run of 2 ranks, resumed on 4: ranks 2 and 3 are new
        torch.manual_seed(rank)
        saved.update(RngState(rank, 2, torch.device("cpu"), seed=1, step=lambda: 10).state_dict())
    draws = []
    for rank in range(4):
        torch.manual_seed(99)  # whatever state the process had before the resume
        RngState(rank, 4, torch.device("cpu"), seed=1, step=lambda: 10).load_state_dict(saved)
        draws.append(torch.rand(4))
    assert all(not torch.equal(draws[a], draws[b]) for a in range(4) for b in range(a))


def test_a_state_that_cannot_be_restored_names_the_checkpoint_and_the_state(tmp_path):
    from argonne_dt.checkpoint import Checkpointer
    from argonne_dt.trainer import Progress

    class Refusing(Progress):
        def load_state_dict(self, entries):
            raise RuntimeError("the data position points elsewhere")

    cfg = _config()
    model = ArgonneModel(cfg.model)
    saved = Checkpointer(tmp_path / "checkpoints", keep_last=0, async_save=False,
                         model_state=ModelOptimizerState(model, None), states={"data": Progress(step=1)}).save(1, cfg.to_dict())
    restoring = Checkpointer(tmp_path / "checkpoints", keep_last=0, async_save=False,
                             model_state=ModelOptimizerState(ArgonneModel(cfg.model), None), states={"data": Refusing()})
    with pytest.raises(CheckpointError, match=r"step-00000001: cannot restore its data state: the data position points"):
        restoring.restore(saved)


def test_a_run_started_from_other_weights_may_hold_out_another_split_but_a_resume_may_not(tmp_path):
    from argonne_dt.checkpoint import Checkpointer
    from argonne_dt.trainer import Progress

    donor_cfg = _config()
    donor_cfg.data.eval_split = 0.0
    donor = ArgonneModel(donor_cfg.model)
    donor.init_weights(seed=3)
    weights = write_model_checkpoint(donor, donor_cfg, tmp_path / "donor")
    cfg = _config()
    cfg.job.dir, cfg.checkpoint.initial_load_path, cfg.data.eval_split = str(tmp_path / "run"), str(weights), 0.005
    model, progress = ArgonneModel(cfg.model), Progress()
    checkpointer = Checkpointer.for_run(cfg, ModelOptimizerState(model, None), {"progress": progress})
    assert checkpointer.load() == weights
    assert all(torch.equal(a, b) for a, b in zip(donor.state_dict().values(), model.state_dict().values()))
    checkpointer.maybe_save(1, force=True)
    cfg.data.eval_split = 0.01  # the run's own checkpoint: its rows were cut with 0.005
    with pytest.raises(CheckpointError, match=r"data.eval_split is 0.01 in this config but 0.005"):
        Checkpointer.for_run(cfg, ModelOptimizerState(ArgonneModel(cfg.model), None), {"progress": Progress()}).load()


def test_a_checkpointer_without_the_runs_settings_only_saves_and_restores(tmp_path):
    from argonne_dt.checkpoint import Checkpointer

    saver = Checkpointer(tmp_path / "checkpoints", keep_last=0, async_save=False,
                         model_state=ModelOptimizerState(ArgonneModel(_config().model), None), states={})
    for call in (saver.load, lambda: saver.maybe_save(1)):
        with pytest.raises(ValueError, match="Checkpointer.for_run"):
            call()

"""The planner's memory and communication figures against a real step at a small shape.

Activations: the planner measures one block on fake tensors under a fake process group at the
planned shape; here a real forward (real tensors, gloo for tp 2) of 3-layer and 1-layer models
at a small shape gives the bytes one layer keeps, by two ways of counting. Collectives: the
planner's closed form against the bytes of every collective of a real training step.
"""

from dataclasses import replace

import pytest
import torch

from argonne_dt.config import ModelConfig, ParallelConfig
from helpers.processes import run_distributed

MODEL = ModelConfig(vocab_size=1001, hidden_size=240, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=40,
                    max_seq_len=64, pad_head_dim=True)
BATCH, SEQ = 2, 48
MODES = ("none", "selective", "full")


def _kept_per_layer(ac: str, sp: bool) -> dict:
    """Bytes one layer keeps from forward to backward in a real forward: (3 layers - 1 layer) / 2,
    counted by following every storage (all modes) and by saved-tensor hooks (no checkpointing,
    where autograd's saved tensors are all that is kept)."""
    import torch.distributed as dist

    from argonne_dt.distributed import build_layout
    from argonne_dt.parallelize import ModelTransforms, build_model
    from torch.multiprocessing.reductions import StorageWeakRef

    from argonne_dt.metrics import local_tensor
    from argonne_dt.memory_plan import StepRecorder, group_dims

    tp = dist.get_world_size() if dist.is_initialized() else 1
    layout = build_layout(ParallelConfig(tp=tp, dp=1, sequence_parallel=sp), "cpu") if tp > 1 else None
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    followed, hooked = {}, {}
    for layers in (1, 3):
        cfg = replace(MODEL, num_layers=layers)
        model = build_model(cfg, layout, seed=0, transforms=ModelTransforms(activation_checkpoint=ac))
        recorder = StepRecorder(group_dims(layout) if layout else {}, model.parameters())
        saved = {}

        def pack(tensor):
            storage = local_tensor(tensor).untyped_storage()
            key = StorageWeakRef(storage).cdata  # saved tensors live on: their addresses stay unique
            # Weights and autocast's copies of them are not activations.
            if key not in recorder.existing and not recorder.is_followed(tensor, "weight_copy"):
                saved[key] = storage.nbytes()
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16), recorder, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            hidden = model(tokens, head=lambda model, hidden, targets: hidden)
            followed[layers] = recorder.live_bytes() - recorder.live_bytes("weight_copy")
            hooked[layers] = sum(saved.values())
        del hidden
    return {"followed": (followed[3] - followed[1]) / 2, "hooked": (hooked[3] - hooked[1]) / 2}


def _planned(tp: int, sp: bool) -> dict:
    from argonne_dt.memory_plan import measured_activations

    return {ac: measured_activations(MODEL, tp, sp, ac, BATCH, SEQ).block_kept for ac in MODES}


def _all_modes(sp: bool) -> dict:
    return {ac: _kept_per_layer(ac, sp) for ac in MODES}


def test_planned_activations_per_layer_equal_a_real_forward_at_tp_1():
    planned = _planned(1, False)
    for ac in MODES:
        measured = _kept_per_layer(ac, False)
        assert planned[ac] == pytest.approx(measured["followed"], rel=0.05), ac
        if ac == "none":
            assert planned[ac] == pytest.approx(measured["hooked"], rel=0.05)
    assert planned["none"] > planned["selective"] > planned["full"] > 0


@pytest.mark.distributed
def test_planned_activations_per_layer_equal_a_real_forward_at_tp_2_with_sequence_parallelism():
    planned = _planned(2, True)
    measured = run_distributed(_all_modes, 2, True)[0]
    for ac in MODES:
        assert planned[ac] == pytest.approx(measured[ac]["followed"], rel=0.05), ac
    assert planned["none"] == pytest.approx(measured["none"]["hooked"], rel=0.05)
    # Sequence parallelism shards what lies between the blocks: less than half of tp 1's in full mode.
    assert planned["full"] == pytest.approx(_planned(1, False)["full"] / 2, rel=0.05)


def _counted_step(tp: int, dp: int, ac: str, micro_batches: int) -> dict:
    from argonne_dt.distributed import build_layout, mixed_precision
    from argonne_dt.optim import build_optimizer
    from argonne_dt.config import OptimConfig
    from argonne_dt.parallelize import ModelTransforms, build_model
    from argonne_dt.memory_plan import StepRecorder, group_dims
    from argonne_dt.step import train_step

    layout = build_layout(ParallelConfig(tp=tp, dp=dp), "cpu")
    model = build_model(replace(MODEL, num_layers=2), layout, seed=0, param_dtype=torch.bfloat16,
                        transforms=ModelTransforms(activation_checkpoint=ac))
    optimizer = build_optimizer(model, OptimConfig(), "cpu")
    window = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(layout.dp_rank))
    batches = [{"input": window[:, :-1], "target": window[:, 1:]}] * micro_batches
    recorder = StepRecorder(group_dims(layout))
    cpu = torch.device("cpu")
    with recorder:
        train_step(model, optimizer, batches, cpu, mixed_precision(torch.bfloat16, cpu), 1.0, layout)
    return dict(recorder.collectives)


@pytest.mark.distributed
@pytest.mark.parametrize("tp, dp, ac", [(2, 1, "full"), (1, 2, "none"), (2, 2, "selective")])
def test_collective_bytes_of_a_real_step_equal_the_closed_form(tp, dp, ac):
    from argonne_dt.memory_plan import collective_bytes

    counted = run_distributed(_counted_step, tp * dp, tp, dp, ac, 2)
    expected = collective_bytes(replace(MODEL, num_layers=2), tp, dp, ac, BATCH, SEQ, micro_batches=2)
    # Rank 0 (tp rank 0 holds the larger share of an uneven vocabulary, which the closed form counts).
    assert counted[0] == dict(expected)


@pytest.mark.parametrize("tokens", [512, 4096])
def test_the_measured_loss_transient_agrees_with_the_loss_modules_count(tokens):
    """Two derivations of the fused loss's peak at TP 1 (4b9 widths): the planner's, measured through
    the model's loss path and scaled to the planned shape, and ``loss.fused_loss_bytes``, counted
    from the code of the chunk loop."""
    import math

    from argonne_dt.config import load_config
    from argonne_dt.loss import fused_loss_bytes
    from argonne_dt.memory_plan import measured_activations

    m = load_config("4b9.toml").model
    measured = measured_activations(m, 1, False, "full", 1, tokens)
    counted = fused_loss_bytes(tokens, measured.loss_chunk, m.vocab_size, m.hidden_size, torch.bfloat16,
                               transposed_copy=False)  # planned as a GPU runs it
    assert measured.loss_chunk and math.isclose(measured.loss_peak, counted, rel_tol=0.02)


def test_measured_figures_do_not_depend_on_what_the_process_measured_before():
    """Storages are followed by weak references to themselves: an address reused after a free is a
    new storage, and a free is never lost, whatever was measured before in the process."""
    from dataclasses import astuple

    from argonne_dt.config import load_config
    from argonne_dt.memory_plan import _measure

    m = load_config("4b9.toml").model
    measure = _measure.__wrapped__  # past the cache: each call measures
    first = measure(astuple(m), 8, True, "full", 4, 4096, "cuda")
    for ac in ("none", "selective"):
        measure(astuple(m), 8, True, ac, 4, 4096, "cuda")
    assert measure(astuple(m), 8, True, "full", 4, 4096, "cuda") == first


def test_the_planned_loss_is_the_gpus_whatever_this_cpu_does_in_bf16():
    """On a CPU without native bf16 the fused loss keeps a transposed weight copy that no GPU makes;
    the planner measures the loss as the GPU runs it."""
    from unittest import mock

    from argonne_dt import loss
    from argonne_dt.memory_plan import _measure_loss

    m = replace(MODEL, vocab_size=151_665)
    measure = _measure_loss.__wrapped__
    here = measure(astuple_of(m), 1, False, 2048)
    with mock.patch.object(loss, "native_bf16", lambda device: False):
        assert measure(astuple_of(m), 1, False, 2048) == here
    with mock.patch.object(loss, "native_bf16", lambda device: True):
        assert measure(astuple_of(m), 1, False, 2048) == here


def astuple_of(model):
    from dataclasses import astuple

    return astuple(model)

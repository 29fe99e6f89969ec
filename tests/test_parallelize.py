"""Tensor parallel (+SP, vocab-parallel loss), FSDP2 x TP and activation checkpointing against one device.

One spawn of 4 gloo ranks runs every case (spawning is the slow part); each test asserts on its
case's measurements.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from argonne_dt.config import ConfigError, ParallelConfig
from argonne_dt.distributed import full_value
from argonne_dt.loss import cross_entropy_loss, loss_context
from argonne_dt.model import ArgonneModel
from argonne_dt.optim import clip_grad_norm_
from argonne_dt.parallelize import ModelTransforms, build_model, parallelize
from argonne_dt.step import accumulate_gradients
from helpers.comparisons import BATCH, MODEL, SEQ, case_layout, max_relative_error, unwrapped_name
from helpers.models import odd_model_config
from helpers.processes import run_distributed

pytestmark = pytest.mark.distributed


CASES = {
    # name: (mesh shape, parallel config, apply FSDP over "dp"?)
    "tp4": ((4,), dict(tp=4)),
    "tp2": ((2, 2), dict(tp=2)),
    "tp2_no_sp_no_loss_parallel": ((2, 2), dict(tp=2, sequence_parallel=False, loss_parallel=False)),
    "dp2_tp2": ((2, 2), dict(tp=2, dp=2)),
    "dp4_tp1": ((4, 1), dict(tp=1, dp=4)),
    "tp2_ac_full": ((2, 2), dict(tp=2, activation_checkpoint="full")),
    "tp2_ac_selective_ops": ((2, 2), dict(tp=2, activation_checkpoint="selective")),
    "tp2_ac_every_2nd": ((2, 2), dict(tp=2, activation_checkpoint="selective", ac_every=2)),
    "dp2_tp2_ac_full": ((2, 2), dict(tp=2, dp=2, activation_checkpoint="full")),
}
# Compiling takes most of a spawn's time: it gets its own two ranks.
COMPILED_CASES = {"tp2_compile_ac_full": ((2,), dict(tp=2, compile=True, activation_checkpoint="full"))}


def _run_case(shape, parallel_kwargs) -> dict:
    parallel = ParallelConfig(**parallel_kwargs)
    layout = case_layout(shape, parallel)
    torch.manual_seed(0)
    reference = ArgonneModel(odd_model_config(**MODEL))
    model = parallelize(copy.deepcopy(reference), layout, transforms=ModelTransforms.of(parallel))
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    local = tokens.chunk(layout.dp)[layout.dp_rank]

    ref_loss = cross_entropy_loss(reference(tokens[:, :-1]), tokens[:, 1:])
    ref_loss.backward()
    with torch.no_grad():
        ref_local_loss = cross_entropy_loss(reference(local[:, :-1]), local[:, 1:])
    with loss_context(layout):
        loss = cross_entropy_loss(model(local[:, :-1]), local[:, 1:])
        loss.backward()

    ref_params = dict(reference.named_parameters())
    grad_errors = {unwrapped_name(n): max_relative_error(full_value(p.grad), ref_params[unwrapped_name(n)].grad)
                   for n, p in model.named_parameters()}
    local_shapes = {unwrapped_name(n): tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape)
                    for n, p in model.named_parameters()}
    tied_before = model.lm_head.weight is model.embed.weight
    # Clipping must see the global norm (every shard, every rank), not a rank's local one.
    norm = clip_grad_norm_(list(model.parameters()), max_norm=1e9).item()
    ref_norm = clip_grad_norm_(list(reference.parameters()), max_norm=1e9).item()

    for m in (reference, model):
        # eps near the gradient scale keeps the update a function of the gradient's size, not just its
        # sign (the first Adam step is sign(g) for eps -> 0), so a wrongly scaled gradient shows.
        torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, foreach=True).step()
    param_errors = {unwrapped_name(n): max_relative_error(full_value(p.detach()),
                                                          ref_params[unwrapped_name(n)].detach())
                    for n, p in model.named_parameters()}
    return {
        "loss_error": abs(full_value(loss).item() - ref_local_loss.item()),
        "grad_norm_error": abs(norm - ref_norm) / ref_norm,
        "grad_errors": grad_errors,
        "param_errors": param_errors,
        "param_names": sorted(unwrapped_name(n) for n, _ in model.named_parameters()),
        "tied": tied_before and model.lm_head.weight is model.embed.weight,
        "local_shapes": local_shapes,
    }


def _bf16_dtypes(shape, parallel_kwargs) -> dict:
    """Under bf16 autocast (and bf16 FSDP gathers): matmul outputs, block inputs, master weights."""
    layout = case_layout(shape, ParallelConfig(**parallel_kwargs))
    model = parallelize(ArgonneModel(odd_model_config(**MODEL)), layout, param_dtype=torch.bfloat16)
    seen = {}
    for name in ("layers.0.attn.q_proj", "layers.1.mlp.down_proj", "lm_head"):
        model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, str(out.dtype))
        )
    # What a block receives: the residual stream (seen by its first norm) and the rotary tables.
    model.layers[1].attn_norm.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("residual", str(args[0].dtype)))
    model.layers[1].attn.register_forward_pre_hook(lambda mod, args: seen.__setitem__("rotary", str(args[1].dtype)))
    tokens = torch.randint(0, MODEL["vocab_size"], (2, SEQ + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16), loss_context(layout):
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
    seen["master_weights"] = sorted({str(p.dtype) for p in model.parameters()})
    return seen


def _materialize_errors(shape, parallel_kwargs) -> float:
    """Largest difference between a meta-built, shard-by-shard initialized model and a single-device init."""
    reference = ArgonneModel(odd_model_config(**MODEL))
    reference.init_weights(seed=5)
    parallel = ParallelConfig(**parallel_kwargs)
    layout = case_layout(shape, parallel)
    model = build_model(odd_model_config(**MODEL), layout, "cpu", seed=5, transforms=ModelTransforms.of(parallel))
    ref = dict(reference.named_parameters())
    worst = max((full_value(p.detach()) - ref[unwrapped_name(n)]).abs().max().item()
                for n, p in model.named_parameters())
    tokens = torch.randint(0, MODEL["vocab_size"], (2, SEQ))
    with torch.no_grad(), loss_context(layout):
        logits = full_value(model(tokens))
    return max(worst, (logits - reference(tokens)).abs().max().item()) if model.lm_head.weight is model.embed.weight else float("inf")


def _errors() -> dict:
    layout = case_layout((4,), ParallelConfig(tp=4))
    messages = {}
    bad_heads = ArgonneModel(odd_model_config(**{**MODEL, "num_kv_heads": 2}))
    try:
        parallelize(bad_heads, layout)
    except ConfigError as err:
        messages["kv_heads"] = str(err)
    model = parallelize(ArgonneModel(odd_model_config(**MODEL)), layout)
    try:
        model(torch.zeros(1, 18, dtype=torch.long))
    except ConfigError as err:
        messages["seq_len"] = str(err)
    return messages


def _accumulation(shape, parallel_kwargs) -> dict:
    """Two accumulated micro-batches through the trainer's own loop, against one device's full batch:
    gradients, and how many reduce-scatters FSDP2 issued."""
    layout = case_layout(shape, ParallelConfig(**parallel_kwargs))
    reference = ArgonneModel(odd_model_config(**MODEL))
    model = parallelize(copy.deepcopy(reference), layout)
    # Two rows per dp rank, so that every rank has two micro-batches to accumulate.
    tokens = torch.randint(0, MODEL["vocab_size"], (2 * layout.dp, SEQ + 1), generator=torch.Generator().manual_seed(2))
    local = tokens.chunk(layout.dp)[layout.dp_rank]
    micro_batches = [{"input": half[:, :-1], "target": half[:, 1:]} for half in local.chunk(2)]
    assert len(micro_batches) == 2
    cross_entropy_loss(reference(tokens[:, :-1]), tokens[:, 1:]).backward()

    reduce_scatters = 0
    # FSDP2 calls one of these, depending on the torch release.
    real = {name: getattr(dist, name) for name in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, name)}

    def counting(function):
        def call(*args, **kwargs):
            nonlocal reduce_scatters
            reduce_scatters += 1
            return function(*args, **kwargs)
        return call

    for name, function in real.items():
        setattr(dist, name, counting(function))
    try:
        accumulate_gradients(model, micro_batches, torch.device("cpu"), contextlib.nullcontext(), layout)
    finally:
        for name, function in real.items():
            setattr(dist, name, function)
    ref_params = dict(reference.named_parameters())
    grad_errors = {unwrapped_name(n): max_relative_error(full_value(p.grad), ref_params[unwrapped_name(n)].grad)
                   for n, p in model.named_parameters()}
    return {"grad_errors": grad_errors, "reduce_scatters": reduce_scatters,
            "fsdp_modules": 1 + len(model.layers)}


def _all_cases() -> dict:
    results = {name: _run_case(shape, kwargs) for name, (shape, kwargs) in CASES.items()}
    results["bf16_tp2"] = _bf16_dtypes((2, 2), dict(tp=2))
    results["bf16_dp2_tp2"] = _bf16_dtypes((2, 2), dict(tp=2, dp=2))
    results["bf16_dp4"] = _bf16_dtypes((4, 1), dict(tp=1, dp=4))
    results["accumulate_dp2_tp2"] = _accumulation((2, 2), dict(tp=2, dp=2))
    results["accumulate_dp4"] = _accumulation((4, 1), dict(tp=1, dp=4))
    results["errors"] = _errors()
    results["materialize"] = {
        "tp4": _materialize_errors((4,), dict(tp=4)),
        "dp2_tp2": _materialize_errors((2, 2), dict(tp=2, dp=2, activation_checkpoint="full")),
    }
    return results


def _compiled_cases() -> dict:
    return {name: _run_case(shape, kwargs) for name, (shape, kwargs) in COMPILED_CASES.items()}


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(_all_cases, 4)


@pytest.fixture(scope="module")
def compiled_per_rank() -> list[dict]:
    return run_distributed(_compiled_cases, 2)


@pytest.mark.parametrize("case", list(CASES) + list(COMPILED_CASES))
def test_loss_gradients_and_step_match_single_device(request, case):
    per_rank = request.getfixturevalue("compiled_per_rank" if case in COMPILED_CASES else "per_rank")
    reference_names = sorted(n for n, _ in ArgonneModel(odd_model_config(**MODEL)).named_parameters())
    for rank, results in enumerate(per_rank):
        r = results[case]
        assert r["param_names"] == reference_names
        assert r["loss_error"] < 1e-5, (rank, r["loss_error"])
        assert r["grad_norm_error"] < 1e-5, (rank, r["grad_norm_error"])
        worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-4, (rank, worst)
        worst = max(r["param_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, worst)
        assert r["tied"], "embedding and lm_head must stay one parameter"


def test_tp4_local_shards(per_rank):
    # vocab 1001 over 4 ranks: torch.chunk gives 251, 251, 251, 248 rows.
    vocab_rows = [251, 251, 251, 248]
    for rank, results in enumerate(per_rank):
        shapes = results["tp4"]["local_shapes"]
        assert shapes["embed.weight"] == (vocab_rows[rank], 144)
        assert shapes["layers.0.attn.q_proj.weight"] == (2 * 18, 144)  # 2 of 8 query heads
        assert shapes["layers.0.attn.k_proj.weight"] == (1 * 18, 144)  # 1 of 4 kv heads
        assert shapes["layers.0.attn.o_proj.weight"] == (144, 2 * 18)
        assert shapes["layers.1.mlp.gate_proj.weight"] == (512 // 4, 144)
        assert shapes["layers.1.mlp.down_proj.weight"] == (144, 512 // 4)
        assert shapes["layers.1.mlp_norm.weight"] == (144,)


@pytest.mark.parametrize("case", ["bf16_tp2", "bf16_dp2_tp2", "bf16_dp4"])
def test_bf16_matmuls_over_an_fp32_residual_stream_under_tp_and_fsdp(per_rank, case):
    for results in per_rank:
        seen = results[case]
        assert seen["layers.0.attn.q_proj"] == seen["layers.1.mlp.down_proj"] == "torch.bfloat16"
        assert seen["lm_head"] == "torch.bfloat16"
        assert seen["master_weights"] == ["torch.float32"]
        # FSDP2 must not cast block inputs: the numerics may not depend on the dp size.
        assert seen["residual"] == seen["rotary"] == "torch.float32"


@pytest.mark.parametrize("case", ["accumulate_dp2_tp2", "accumulate_dp4"])
def test_fsdp_accumulation_reduces_gradients_once_per_step(per_rank, case):
    for rank, results in enumerate(per_rank):
        r = results[case]
        worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-4, (rank, worst)
        # One reduce-scatter per FSDP unit (the blocks and the root), not one per micro-batch.
        assert r["reduce_scatters"] == r["fsdp_modules"], (rank, r["reduce_scatters"])


def test_meta_model_initialized_shard_by_shard_equals_single_device_init(per_rank):
    for results in per_rank:
        assert results["materialize"]["tp4"] < 1e-5
        assert results["materialize"]["dp2_tp2"] < 1e-5


def test_errors_name_the_values(per_rank):
    messages = per_rank[0]["errors"]
    assert "tensor-parallel degree 4" not in messages["kv_heads"]  # raised by the shared config check
    assert "parallel.tp=4 must divide model.num_kv_heads=2" in messages["kv_heads"]
    assert "sequence length 18 is not divisible by the tensor-parallel degree 4" in messages["seq_len"]

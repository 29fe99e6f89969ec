"""The tensor-parallel plan checked by value: 4b9's local shards at TP 8 (a fake process group) against
the table in TENSOR_PARALLEL_USAGE.md; the tied lm_head and embedding and every norm gradient against one
device (one spawn of 2 gloo ranks); the world size a layout needs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from argonne_dt.config import ConfigError, ParallelConfig
from argonne_dt.distributed import build_layout, full_value
from argonne_dt.loss import cross_entropy_loss, loss_context
from argonne_dt.model import ArgonneModel
from argonne_dt.parallelize import build_model, parallelize
from helpers.comparisons import BATCH, MODEL, SEQ, case_layout, max_relative_error, unwrapped_name
from helpers.models import odd_model_config
from helpers.processes import run_distributed

pytestmark = pytest.mark.distributed


def test_world_size_must_equal_dp_times_tp():
    with pytest.raises(ConfigError, match=r"world size 4 must equal parallel.dp \* parallel.tp = 3 \* 2"):
        build_layout(ParallelConfig(tp=2, dp=3), "cpu", world_size=4)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tp=4"):
        build_layout(ParallelConfig(tp=4), "cpu", world_size=6)


def _usage_table() -> dict[str, tuple[str, str]]:
    """Rows of the TP table in TENSOR_PARALLEL_USAGE.md: parameter -> (full shape, local shape cell)."""
    text = (Path(__file__).parents[1] / "TENSOR_PARALLEL_USAGE.md").read_text()
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `([\w.*]+)`[^|]* \| [^|]+ \| (\([\d, ]+\)) \| ([^|]+) \|", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


@pytest.mark.parametrize("rank", [0, 7])
def test_4b9_tp8_local_shards_match_the_usage_table(rank):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from argonne_dt.config import load_config

    cfg = load_config("4b9.toml")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
    try:
        model = build_model(cfg.model, build_layout(cfg.parallel, "cpu"), device="meta")
        local = {unwrapped_name(n): (tuple(p.shape), tuple(p.to_local().shape)) for n, p in model.named_parameters()}
        total_local = sum(p.to_local().numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    table = _usage_table()
    assert len(table) == 11
    for name, (full, local_cell) in table.items():
        pattern = re.compile(name.replace(".", r"\.").replace("*", r"\d+") + r"$")
        matches = [n for n in local if pattern.match(n)]
        assert matches, name
        cells = re.findall(r"\(([\d, ]+)\)", local_cell)
        expected_local = _shape(cells[-1] if rank == 7 and len(cells) > 1 else cells[0])
        for n in matches:
            assert local[n] == (_shape(full), expected_local), n
    if rank == 0:
        assert f"**{total_local:,}**" in (Path(__file__).parents[1] / "TENSOR_PARALLEL_USAGE.md").read_text()


# The plan checked by value: a lost tie or a norm outside sequence parallelism shows in these
# numbers directly, before anything downstream (clipping, the optimizer) could crash on it.
PLAN_CASES = {"tp2": dict(tp=2), "tp2_no_sp": dict(tp=2, sequence_parallel=False)}


def _tie_and_norm_gradients(parallel_kwargs) -> dict:
    """The parallel model's tied weight and norm gradients against one device (untied there, so the
    two uses of the tied weight give separate gradients to add)."""
    layout = case_layout((2,), ParallelConfig(**parallel_kwargs))
    torch.manual_seed(0)
    reference = ArgonneModel(odd_model_config(**MODEL))
    model = parallelize(copy.deepcopy(reference), layout)
    reference.lm_head.weight = torch.nn.Parameter(reference.embed.weight.detach().clone())
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    cross_entropy_loss(reference(tokens[:, :-1]), tokens[:, 1:]).backward()
    with loss_context(layout):
        cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    embed, lm_head = model.embed.weight, model.lm_head.weight
    ref_params = dict(reference.named_parameters())
    return {
        "one_parameter": lm_head is embed,
        "same_storage": lm_head.to_local().untyped_storage().data_ptr() == embed.to_local().untyped_storage().data_ptr(),
        "tied_grad_error": max_relative_error(full_value(embed.grad),
                                              ref_params["embed.weight"].grad + ref_params["lm_head.weight"].grad),
        "norm_grad_errors": {n: max_relative_error(full_value(p.grad), ref_params[n].grad)
                             for n, p in model.named_parameters() if n.endswith("norm.weight")},
    }


def _plan_cases() -> dict:
    return {name: _tie_and_norm_gradients(kwargs) for name, kwargs in PLAN_CASES.items()}


@pytest.fixture(scope="module")
def plan_per_rank() -> list[dict]:
    return run_distributed(_plan_cases, 2)


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_lm_head_and_embedding_are_one_parameter_with_the_sum_of_both_gradients(plan_per_rank, case):
    for rank, results in enumerate(plan_per_rank):
        r = results[case]
        assert r["one_parameter"] and r["same_storage"], rank
        assert r["tied_grad_error"] < 1e-5, (rank, r["tied_grad_error"])


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_every_norm_gradient_equals_single_device(plan_per_rank, case):
    for rank, results in enumerate(plan_per_rank):
        errors = results[case]["norm_grad_errors"]
        assert len(errors) == 2 * MODEL["num_layers"] + 1
        worst = max(errors.items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, worst)

"""The planner: parameter figures from the really parallelized model on the meta device, memory and
time composed from measured and counted parts, layouts ranked."""

import pytest

from argonne_dt.plan import GPUS, plan


@pytest.mark.parametrize("tp, dp", [(8, 1), (4, 2)])
def test_plan_cross_checks_shards_and_gives_a_verdict(tp, dp):
    # plan() raises if the meta-device shards disagree with the closed form.
    rows = {ac: plan("4b9.toml", tp, dp, "a100-80gb", 2, None, ac) for ac in ("none", "full")}
    full, none = rows["full"], rows["none"]
    if (tp, dp) == (8, 1):
        assert full["local_parameters"] == 614_937_600
        assert "autocast_weight_copies" in full["memory_gib"]
    else:
        assert "fsdp_gathered_bf16" in full["memory_gib"] and "fsdp_accumulated_gradients" in full["memory_gib"]
    assert full["fits"] and full["total_gib"] < none["total_gib"]
    memory = full["memory_gib"]
    assert memory["parameters_fp32"] * 4 == pytest.approx(
        memory["parameters_fp32"] + memory["gradients_fp32"] + memory["adamw_state_fp32"])
    # Full checkpointing recomputes each block's forward: more compute, more collectives, slower.
    assert full["compute_s"] > none["compute_s"] and full["step_s"] > none["step_s"]
    assert full["predicted_tokens_per_s"] == pytest.approx(2**16 / full["step_s"])
    assert 0 < full["mfu"] < GPUS["a100-80gb"].matmul_efficiency


def test_a_too_big_batch_does_not_fit():
    row = plan("4b9.toml", 1, 1, "a100-80gb", 16, None, "none")
    assert not row["fits"]


def test_distillation_plans_add_the_teacher_and_refuse_what_tp_cannot_split():
    from argonne_dt.config import load_config
    from argonne_dt.parallelize import build_model
    from argonne_dt.plan import teacher_model

    seven = plan("4b9.toml", 8, 1, "a100-80gb", 4, None, "full", teacher="qwen2.5-7b")
    assert not seven["fits"] and "must divide model.num_kv_heads=4" in seven["teacher_reason"]
    alone = plan("4b9.toml", 8, 1, "a100-80gb", 4, None, "full")
    for name, billions in (("qwen2.5-14b", 14.7), ("qwen2.5-32b", 32.7)):
        row = plan("4b9.toml", 8, 1, "a100-80gb", 4, None, "full", teacher=name)
        model = teacher_model(name, load_config("4b9.toml").model)
        total = build_model(model, device="meta").num_parameters()
        assert abs(total / 1e9 - billions) < 0.1
        # Each of 8 ranks holds an eighth, but all of the norms and the vocabulary rows rounded up.
        norms = (2 * model.num_layers + 1) * model.hidden_size
        vocab_rounding = (-(-model.vocab_size // 8) - model.vocab_size / 8) * 2 * model.hidden_size
        assert row["teacher_local_parameters"] == total / 8 + 7 / 8 * norms + vocab_rounding
        assert row["memory_gib"]["teacher_weights_bf16"] == pytest.approx(2 * row["teacher_local_parameters"] / 2**30)
        assert row["memory_gib"]["teacher_forward"] > 0
        assert row["fits"] and row["total_gib"] > alone["total_gib"] + row["memory_gib"]["teacher_weights_bf16"]
        assert row["predicted_tokens_per_s"] < alone["predicted_tokens_per_s"]


def test_layouts_are_ranked_fastest_first_and_all_fit():
    from argonne_dt.plan import layouts

    rows = layouts("tiny.toml", 4, "a100-40gb")
    assert rows and all(r["fits"] and r["tp"] * r["dp"] == 4 for r in rows)
    speeds = [r["predicted_tokens_per_s"] for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    assert {r["tp"] for r in rows} == {1, 2}  # tiny's 2 kv heads split at most 2 ways

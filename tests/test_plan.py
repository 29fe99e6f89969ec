"""The memory planner's parameter figures come from the really parallelized model on the meta device."""

import pytest

from argonne_dt.plan import plan


@pytest.mark.parametrize("tp, dp", [(8, 1), (4, 2)])
def test_plan_cross_checks_shards_and_gives_a_verdict(tp, dp):
    # plan() raises if the meta-device shards disagree with the closed form.
    rows = {ac: plan("4b9.toml", tp, dp, "a100-80gb", 4, None, ac, True, 0.5) for ac in ("none", "full")}
    full = rows["full"]
    if (tp, dp) == (8, 1):
        assert full["local_parameters"] == 614_937_600
    assert full["fits"] and full["total_gib"] < rows["none"]["total_gib"]
    assert full["parameters_fp32_gib"] * 4 == pytest.approx(
        full["parameters_fp32_gib"] + full["gradients_fp32_gib"] + full["adamw_state_fp32_gib"])
    assert 35_000 < full["predicted_tokens_per_s"] < 38_000  # 8 GPUs x 312 TFLOP/s at 50% MFU


def test_a_too_big_batch_does_not_fit():
    row = plan("4b9.toml", 1, 1, "a100-80gb", 8, None, "none", True, 0.5)
    assert not row["fits"]


def test_distillation_plans_add_the_teacher_and_refuse_what_tp_cannot_split():
    from argonne_dt.config import load_config
    from argonne_dt.parallelize import build_model
    from argonne_dt.plan import teacher_model

    seven = plan("4b9.toml", 8, 1, "a100-80gb", 4, None, "full", True, 0.5, teacher="qwen2.5-7b")
    assert not seven["fits"] and "must divide model.num_kv_heads=4" in seven["teacher_reason"]
    alone = plan("4b9.toml", 8, 1, "a100-80gb", 4, None, "full", True, 0.5)
    for name, billions in (("qwen2.5-14b", 14.7), ("qwen2.5-32b", 32.7)):
        row = plan("4b9.toml", 8, 1, "a100-80gb", 4, None, "full", True, 0.5, teacher=name)
        model = teacher_model(name, load_config("4b9.toml").model)
        total = build_model(model, device="meta").num_parameters()
        assert abs(total / 1e9 - billions) < 0.1
        # Each of 8 ranks holds an eighth, but all of the norms and the vocabulary rows rounded up.
        norms = (2 * model.num_layers + 1) * model.hidden_size
        vocab_rounding = (-(-model.vocab_size // 8) - model.vocab_size / 8) * 2 * model.hidden_size
        assert row["teacher_local_parameters"] == total / 8 + 7 / 8 * norms + vocab_rounding
        assert row["teacher_weights_bf16_gib"] == pytest.approx(2 * row["teacher_local_parameters"] / 2**30)
        assert row["fits"] and row["total_gib"] > alone["total_gib"] + row["teacher_weights_bf16_gib"]
        assert row["predicted_tokens_per_s"] < alone["predicted_tokens_per_s"]

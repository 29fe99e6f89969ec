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

"""The planner: parameter figures from the really parallelized model on the meta device, memory and
time composed from measured and counted parts, layouts ranked."""

import pytest

from argonne_dt.memory_plan import GPUS, plan


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
    from argonne_dt.memory_plan import teacher_model

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
    from argonne_dt.memory_plan import layouts

    rows = layouts("tiny.toml", 4, "a100-40gb")
    assert rows and all(r["fits"] and r["tp"] * r["dp"] == 4 for r in rows)
    speeds = [r["predicted_tokens_per_s"] for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    assert {r["tp"] for r in rows} == {1, 2}  # tiny's 2 kv heads split at most 2 ways


def test_exposed_fsdp_time_by_hand():
    from argonne_dt.memory_plan import fsdp_exposed_seconds

    # Two micro-batches of 1 s compute, 2 s of gathers each (0.25 s of them first, with nothing to
    # overlap): 0.25 + (2 - 0.25 - 1) exposed per micro-batch. The step's 3 s reduce-scatter hides
    # behind the last backward (1 s) except the root's 0.5 s, which comes after it: 0.5 + (3 - 0.5 - 1).
    # Clipping's all-reduces (0.1 s) wait in line.
    assert fsdp_exposed_seconds(gather_s=4, scatter_s=3, in_line_s=0.1, first_gather_s=0.25, last_scatter_s=0.5,
                                compute_s=2, last_backward_s=1, micro_batches=2) == pytest.approx(2 * 1.0 + 2.0 + 0.1)
    # Compute longer than everything: only the first gathers of each micro-batch and the root's scatter.
    assert fsdp_exposed_seconds(gather_s=4, scatter_s=3, in_line_s=0, first_gather_s=0.25, last_scatter_s=0.5,
                                compute_s=40, last_backward_s=10, micro_batches=4) == pytest.approx(4 * 0.25 + 0.5)


def test_distillation_counts_the_teachers_collectives():
    from dataclasses import replace

    from argonne_dt.config import ModelConfig
    from argonne_dt.memory_plan import _local_tensor_shapes, _padded, collective_bytes

    student = ModelConfig(vocab_size=1001, hidden_size=240, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=40)
    teacher = replace(student, hidden_size=320, num_layers=3, num_heads=8, head_dim=40, attention_bias=True,
                      tie_embeddings=False)
    tokens, micro_batches = 2 * 48, 3
    alone = collective_bytes(student, 2, 2, "full", 2, 48, micro_batches)
    distilling = collective_bytes(student, 2, 2, "full", 2, 48, micro_batches, teacher=teacher)
    sharded = collective_bytes(student, 2, 2, "full", 2, 48, micro_batches, teacher=teacher, teacher_fsdp=True)
    teacher_activation = 2 * tokens * 320  # bf16
    # Its forward under sequence parallelism: two gathers and two reduce-scatters per block, its final
    # hidden states gathered for the loss, its bf16 embedding's partial sums reduce-scattered.
    extra_tp = micro_batches * (2 * 3 + 1) * teacher_activation
    assert distilling[("all_gather", "tp")] - alone[("all_gather", "tp")] == extra_tp
    assert distilling[("reduce_scatter", "tp")] - alone[("reduce_scatter", "tp")] == extra_tp
    # The distillation loss reduces 2 maxima and 5 sums per token (fp32) where cross-entropy reduces 1 and 2;
    # the step averages 3 terms (loss, CE, KL) over the dp group where pretraining averages 1.
    assert distilling[("all_reduce", "tp")] - alone[("all_reduce", "tp")] == micro_batches * 4 * 4 * tokens
    assert distilling[("all_reduce", "dp")] - alone[("all_reduce", "dp")] == 2 * 4
    assert distilling[("all_gather", "dp")] == alone[("all_gather", "dp")]
    # With its blocks sharded over dp: each gathered once per micro-batch, in bf16 (no backward).
    teacher_block = _padded(_local_tensor_shapes(teacher, 2)[0], 2)
    assert sharded[("all_gather", "dp")] - alone[("all_gather", "dp")] == micro_batches * 3 * 2 * teacher_block


@pytest.mark.parametrize("config, tp, dp, micro_batch", [("tiny.toml", 1, 2, 2), ("tiny.toml", 2, 3, 4),
                                                         ("4b9.toml", 8, 2, 2), ("4b9.toml", 4, 2, 1)])
def test_the_planned_step_is_the_one_the_layout_of_that_run_computes(config, tp, dp, micro_batch):
    from dataclasses import replace

    from argonne_dt.config import load_config
    from argonne_dt.distributed import build_layout
    from argonne_dt.memory_plan import fake_world, plan

    cfg = load_config(config)
    row = plan(config, tp, dp, "a100-80gb", micro_batch, None, "full")
    with fake_world(tp * dp):
        layout = build_layout(replace(cfg.parallel, tp=tp, dp=dp), "cpu",
                              train=replace(cfg.train, micro_batch_size=micro_batch), seq_len=cfg.data.seq_len)
    assert (row["micro_batches"], row["tokens_per_step"]) == (layout.grad_accum_steps, layout.tokens_per_step)


def test_a_micro_batch_the_global_batch_cannot_be_formed_from_is_named():
    from argonne_dt.config import ConfigError
    from argonne_dt.memory_plan import plan

    with pytest.raises(ConfigError, match=r"a micro-batch of 3 on 2 dp rank\(s\): train.global_batch_size=16"):
        plan("4b9.toml", 4, 2, "a100-80gb", 3, None, "full")


def test_a_layout_built_without_the_batch_does_not_guess_its_tokens():
    from argonne_dt.config import ParallelConfig
    from argonne_dt.distributed import build_layout
    from argonne_dt.memory_plan import fake_world

    with fake_world(2):
        layout = build_layout(ParallelConfig(tp=2, dp=1), "cpu")
    with pytest.raises(ValueError, match="built without the run's batch"):
        layout.tokens_per_step


def test_the_planner_refuses_a_step_the_trainer_refuses():
    from dataclasses import replace

    from argonne_dt.config import ConfigError, load_config
    from argonne_dt.memory_plan import step_batch

    train = replace(load_config("4b9.toml").train, grad_accum_steps=4)  # 4 x 4 = 16 sequences on one rank
    assert step_batch(train, 4, 1) == (16, 4)
    with pytest.raises(ConfigError, match="train.grad_accum_steps=4 contradicts train.global_batch_size=16"):
        step_batch(train, 4, 2)

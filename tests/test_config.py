import pytest

from argonne_dt.config import ConfigError, describe_fields, load_config


def test_bundled_configs_load_by_bare_name():
    big = load_config("4b9.toml")
    assert (big.model.hidden_size, big.model.num_layers, big.model.head_dim) == (4080, 24, 170)
    assert (big.model.num_heads, big.model.num_kv_heads, big.model.ffn_dim) == (24, 8, 11008)
    assert big.model.vocab_size == 151_665 and big.data.seq_len == 4096 and big.parallel.tp == 8
    assert (big.optim.lr, big.optim.min_lr, big.optim.warmup_steps) == (1e-4, 1e-5, 2000)
    assert (big.optim.weight_decay, big.optim.grad_clip, big.optim.fused) == (0.1, 1.0, True)
    tokens = big.train.steps * big.train.global_batch_size * big.data.seq_len
    assert 21.8e9 < tokens < 22.0e9
    tiny = load_config("tiny.toml")
    assert tiny.model.vocab_size == 151_665 and tiny.job.dir == "runs/tiny"
    # The sample corpus brings its held-out split: tiny validates without data.eval_paths.
    assert tiny.train.eval_every == 50 and tiny.data.paths == tiny.data.eval_paths == []


def test_derived_intermediate_size_rounds_to_256():
    cfg = load_config("4b9.toml", ["--model.intermediate_size=0"])
    assert cfg.model.ffn_dim == 11008


def test_path_and_overrides_are_typed(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 7\n[data]\npaths = ["a.parquet"]\n')
    cfg = load_config(
        path,
        ["--train.micro_batch_size", "3", "--optim.lr=0.5", "--parallel.sequence_parallel=false",
         "--data.paths=x.parquet,y.parquet", "--job.name", "exp"],
    )
    assert cfg.train.steps == 7 and cfg.train.micro_batch_size == 3
    assert cfg.optim.lr == 0.5 and cfg.parallel.sequence_parallel is False
    assert cfg.data.paths == ["x.parquet", "y.parquet"]
    assert cfg.job.name == "exp" and cfg.job.dir == "runs/exp"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--trian.steps=3"], r"unknown section \[trian\] \(did you mean 'train'\?\)"),
        (["--train.stesp=3"], r"unknown key train.stesp \(did you mean 'steps'\?\)"),
        (["--train.steps=three"], r"train.steps: expected an integer, got 'three'"),
        (["--parallel.compile=maybe"], r"parallel.compile: expected true or false, got 'maybe'"),
        (["--model.hidden_size=4000"], r"model.hidden_size=4000 must equal .* 24 \* 170 = 4080"),
        (["--model.num_kv_heads=7", "--model.num_heads=24"], r"model.num_heads=24 must be divisible by model.num_kv_heads=7"),
        (["--parallel.tp=16"], r"parallel.tp=16 must divide model.num_kv_heads=8"),
        (["--parallel.tp=4", "--model.num_heads=6", "--model.num_kv_heads=2", "--model.hidden_size=1020"],
         r"parallel.tp=4 must divide model.num_kv_heads=2"),
        (["--data.seq_len=4092"], r"data.seq_len=4092 must be divisible by parallel.tp=8"),
        (["--train.dtype=fp16"], r"train.dtype='fp16' must be bf16, fp32 or auto"),
        (["--train.steps"], r"has no value"),
        (["--train.eval_every=50", "--data.paths=a.parquet", "--data.eval_split=0"],
         r"train.eval_every=50 needs held-out data: data.eval_paths"),
        (["--data.eval_split=2.5"], r"data.eval_split=2.5 must be a fraction of the rows"),
        (["--train.downstream_every=10"], r"train.downstream_every=10 needs train.downstream_file"),
        (["--data.read_retries=-1"], r"data.read_retries must be >= 0, got -1"),
        (["train.steps=3"], r"expected --section.key=value"),
    ],
)
def test_bad_values_are_named(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("4b9.toml", overrides)


def test_bad_file_contents_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nhiden_size = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key model.hiden_size \(did you mean 'hidden_size'\?\)"):
        load_config(path)
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="neither a file nor a bundled config"):
        load_config("nope.toml")


def test_world_size_checks():
    from argonne_dt.distributed import data_parallel_size

    cfg = load_config("4b9.toml")
    assert data_parallel_size(cfg.parallel, 16) == 2
    with pytest.raises(ConfigError, match=r"world size 12 is not divisible by parallel.tp=8"):
        data_parallel_size(cfg.parallel, 12)
    cfg.parallel.dp = 3
    with pytest.raises(ConfigError, match=r"world size 16 must equal parallel.dp \* parallel.tp = 3 \* 8"):
        data_parallel_size(cfg.parallel, 16)


def test_every_field_is_documented():
    table = describe_fields()
    assert "`model.hidden_size`" in table and "`checkpoint.keep_last`" in table
    rows = [row.replace("\\|", "") for row in table.splitlines()]
    assert all(row.count("|") == 4 and not row.endswith("|  |") for row in rows)


def test_the_documented_config_table_is_current():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert describe_fields() in page, "regenerate the table in docs/configuration.md from argonne_dt.config.describe_fields()"


def test_auto_dtype_is_bf16_only_where_bf16_matmuls_are_native():
    import torch

    from argonne_dt.distributed import compute_dtype, native_bf16, resolve_auto_dtype

    cpu = torch.device("cpu")
    cfg = load_config("tiny.toml")
    assert cfg.train.dtype == "auto"
    resolved = resolve_auto_dtype(cfg, cpu)
    assert resolved.train.dtype == ("bf16" if native_bf16(cpu) else "fp32") and cfg.train.dtype == "auto"
    assert compute_dtype(resolved, cpu) == compute_dtype(cfg, cpu)
    assert compute_dtype(load_config("4b9.toml"), cpu) == torch.bfloat16  # explicit bf16 stays bf16


def test_a_global_batch_derives_accumulation_and_refuses_what_the_layout_cannot_form():
    from argonne_dt.distributed import grad_accum_steps

    cfg = load_config("tiny.toml", ["--train.global_batch_size=8", "--train.micro_batch_size=2", "--parallel.tp=1"])
    assert [grad_accum_steps(cfg.train, dp) for dp in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match=r"train.global_batch_size=8 cannot be formed on 3 dp rank\(s\) from "
                                          r"train.micro_batch_size=2: .* nearest valid global_batch_size: 6 or 12"):
        grad_accum_steps(cfg.train, 3)
    cfg.train.grad_accum_steps = 3
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps=3 contradicts train.global_batch_size=8 "
                                          r"\(which gives 2 on 2 dp rank"):
        grad_accum_steps(cfg.train, 2)
    cfg.train.grad_accum_steps, cfg.train.global_batch_size = 3, 0  # unset: accumulation as configured
    assert grad_accum_steps(cfg.train, 3) == 3


def test_a_moved_key_under_both_names_is_refused_and_messages_name_the_key_written(tmp_path):
    path = tmp_path / "run.toml"
    for text in ("[train]\nloss_chunk_tokens = 256\n[distill]\nchunk_tokens = 512\n",
                 "[distill]\nchunk_tokens = 512\n[train]\nloss_chunk_tokens = 256\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="distill.chunk_tokens is the former name of train.loss_chunk_tokens"):
            load_config(path)
    path.write_text("[train]\nloss_chunk_tokens = 256\n")
    with pytest.raises(ConfigError, match="give only train.loss_chunk_tokens"):
        load_config(path, ["--distill.chunk_tokens=128"])
    assert load_config(path, ["--train.loss_chunk_tokens=128"]).train.loss_chunk_tokens == 128
    path.write_text("[distill]\nchunk_tokens = 0\nteacher = 'x'\n")
    with pytest.raises(ConfigError, match=r"^distill.chunk_tokens=0 \(full logits\) cannot distill"):
        load_config(path)
    path.write_text("[distill]\nchunk_tokens = -1\n")
    with pytest.raises(ConfigError, match=r"^distill.chunk_tokens must be >= 0"):
        load_config(path)
    path.write_text("[distill]\nchunk_tokens = 64\n")
    assert load_config(path).train.loss_chunk_tokens == 64


def test_every_section_checks_itself_and_validate_names_the_key():
    import dataclasses

    from argonne_dt.config import Config

    cfg = Config()
    assert all(callable(getattr(getattr(cfg, f.name), "check", None)) for f in dataclasses.fields(cfg))
    cfg.metrics.log_every = 0
    with pytest.raises(ConfigError, match=r"metrics.log_every must be >= 1, got 0"):
        cfg.metrics.check()


def test_sampling_settings_that_cannot_sample_are_refused():
    from argonne_dt.generate import SamplingConfig

    for bad, key in ((dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"),
                     (dict(repetition_penalty=0.0), "repetition_penalty")):
        with pytest.raises(ConfigError, match=f"sampling {key} must be"):
            SamplingConfig(**bad)


def test_a_job_and_its_teacher_agree():
    from argonne_dt.config import check_job

    cfg = load_config("tiny.toml")
    with pytest.raises(ConfigError, match="distill.teacher is empty"):
        check_job(cfg, distilling=True)
    cfg.distill.teacher = "some/teacher"
    with pytest.raises(ConfigError, match="makes this a distillation job"):
        check_job(cfg, distilling=False)

"""What the GPU paths call, with which arguments, shown on the CPU: the attention mask and KV-cache
width of generation, the device and autocast of the inference tools, the process-group start-up,
the checkpoint stager, FSDP2's reshard setting, and the selective-checkpointing + compile refusal."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from argonne_dt import distributed, model as model_module
from argonne_dt.config import Config, ConfigError, ParallelConfig, load_config
from argonne_dt.generate import SamplingConfig, generate
from argonne_dt.model import ArgonneModel
from helpers.checkpoints import assert_restores
from helpers.models import odd_model_config

EQUAL_PROMPTS = [[5, 17, 99, 3], [42, 43, 44, 45]]
UNEQUAL_PROMPTS = [[5, 17, 99, 3], [7]]


def _sdpa_masks(monkeypatch) -> list:
    """Records the ``attn_mask`` of every scaled_dot_product_attention call."""
    masks, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return masks


def _greedy_with_a_full_key_mask(model, prompts, steps):
    """Greedy decoding as before: the KV cache and an all-true key mask on every call."""
    tokens = torch.tensor(prompts)
    caches = model.new_kv_caches(len(prompts), tokens.shape[1] + steps)
    start, out = 0, []
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.ones(tokens.shape, dtype=torch.bool)
            chosen = model(tokens[:, start:], caches, start, key_mask=mask)[:, -1].argmax(-1)
            start = tokens.shape[1]
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            out.append(chosen)
    return torch.stack(out, dim=1).tolist()


@pytest.fixture(scope="module")
def padded_model():
    return ArgonneModel(odd_model_config(init_std=0.2, pad_head_dim=True)).eval()


def test_generation_passes_no_mask_unless_a_row_is_padded(padded_model, monkeypatch):
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    expected = _greedy_with_a_full_key_mask(padded_model, EQUAL_PROMPTS, 6)
    masks = _sdpa_masks(monkeypatch)
    assert generate(padded_model, EQUAL_PROMPTS, greedy) == expected
    assert generate(padded_model, EQUAL_PROMPTS, greedy, recompute=True) == expected
    assert len(masks) == 2 * 6 * 2 and all(mask is None for mask in masks)  # both paths, 6 steps, 2 layers
    masks.clear()
    generate(padded_model, UNEQUAL_PROMPTS, greedy)
    assert masks and all(mask is not None for mask in masks)


def test_kv_cache_holds_the_padded_width_and_a_decoded_token_pads_only_itself(padded_model, monkeypatch):
    assert {c.keys.shape[-1] for c in padded_model.new_kv_caches(1, 8)} == {40}  # head_dim 34 -> 40
    padded_lengths, real = [], model_module._pad_last_dim

    def spy(x, multiple):
        padded_lengths.append(x.shape[2])
        return real(x, multiple)

    monkeypatch.setattr(model_module, "_pad_last_dim", spy)
    generate(padded_model, EQUAL_PROMPTS, SamplingConfig(max_new_tokens=5, temperature=0))
    # q, k, v of 2 layers: the 4-token prompt once, then one position per new token (4 of them).
    assert padded_lengths == [4] * 6 + [1] * 6 * 4


def test_inference_tools_use_the_gpu_and_bf16_autocast(monkeypatch, odd_config):
    from argonne_dt import generate as generate_module

    tiny = ArgonneModel(odd_config).eval()
    seen = {}

    def load_model(path, device, layout):
        seen["device"] = device
        return tiny, Config()

    def generate_text(model, data, prompts, cfg, stream=None):
        seen["autocast"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        seen["cache"] = model.new_kv_caches(1, 4)[0].keys.dtype
        return []

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(generate_module, "local_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(generate_module, "load_model", load_model)
    monkeypatch.setattr(generate_module, "generate_text", generate_text)
    monkeypatch.setattr(generate_module, "dtype_named", lambda name, device: torch.bfloat16)  # as on a GPU
    generate_module.generate_from_checkpoint("ckpt", ["A"], SamplingConfig())
    assert seen == {"device": torch.device("cpu"), "autocast": torch.bfloat16, "cache": torch.bfloat16}


class _FakeCuda:
    """torch.cuda as a machine with GPUs shows it; records set_device and init_process_group in order."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: self.calls.append(("set_device", device)))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group",
                            lambda backend, **kwargs: self.calls.append(("init_process_group", backend, kwargs)))
        # local_device turns TF32 on: put the switches back after the test.
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)


def test_process_group_gets_the_device_after_set_device_and_the_configured_timeout(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cuda = _FakeCuda(monkeypatch)
    assert distributed.init_distributed() == torch.device("cuda", 1)
    assert cuda.calls == [("set_device", torch.device("cuda", 1)),
                          ("init_process_group", "nccl", {"timeout": timedelta(minutes=30),
                                                          "device_id": torch.device("cuda", 1)})]
    cuda.calls.clear()
    distributed.init_distributed(timeout_minutes=90)
    assert cuda.calls[-1][2]["timeout"] == timedelta(minutes=90)


def test_trainer_starts_the_group_with_parallel_timeout_minutes(monkeypatch):
    from argonne_dt import trainer

    class Started(Exception):
        pass

    def init_distributed(timeout_minutes):
        raise Started(timeout_minutes)

    monkeypatch.setattr(trainer, "init_distributed", init_distributed)
    with pytest.raises(Started, match="45.0"):
        trainer.Trainer(load_config("tiny.toml", ["--parallel.timeout_minutes=45"]))


def test_expandable_segments_are_the_default_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    _FakeCuda(monkeypatch)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    distributed.init_distributed()
    assert distributed.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    distributed.local_device()
    assert distributed.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    distributed.local_device()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in distributed.os.environ


def test_cpu_start_up_is_gloo_without_a_device_id(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_distributed(5) == torch.device("cpu")
    assert cuda.calls == [("init_process_group", "gloo", {"timeout": timedelta(minutes=5), "device_id": None})]


class _RecordingStager:
    """Wraps the real DefaultStager and counts what the checkpointer does with it."""

    made: list[_RecordingStager] = []

    def __init__(self, options):
        from torch.distributed.checkpoint.staging import DefaultStager

        self.inner, self.options, self.staged, self.closed = DefaultStager(options), options, 0, False
        _RecordingStager.made.append(self)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stage(self, state_dict, **kwargs):
        self.staged += 1
        return self.inner.stage(state_dict, **kwargs)

    def close(self):
        self.closed = True
        self.inner.close()


def test_one_stager_per_run_closed_at_the_end_and_resume_is_bit_equal(tmp_path, monkeypatch, odd_config):
    from argonne_dt import checkpoint
    from argonne_dt.checkpoint import Checkpointer, ModelOptimizerState
    from argonne_dt.trainer import Progress

    monkeypatch.setattr(checkpoint, "DefaultStager", _RecordingStager)
    monkeypatch.setattr(_RecordingStager, "made", [])
    cfg = Config()
    model = ArgonneModel(odd_config)
    progress = Progress(step=1)
    saver = Checkpointer(tmp_path / "checkpoints", keep_last=0, async_save=True,
                         model_state=ModelOptimizerState(model, None), states={"progress": progress}, write_threads=3)
    saver.save(1, cfg.to_dict())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    progress.step = 2
    last = saver.save(2, cfg.to_dict())
    saver.close()
    if checkpoint.REUSABLE_STAGER:
        (stager,) = _RecordingStager.made
        assert stager.staged == 2 and stager.closed
    else:  # one per save, each closed after its save
        assert [(s.staged, s.closed) for s in _RecordingStager.made] == [(1, True), (1, True)]
    assert len(list(last.glob("*.distcp"))) == 3  # one file per writer thread
    assert_restores(last, model, step=2)


def test_staging_is_pinned_and_non_blocking_on_gpus_and_finishes_in_the_save(monkeypatch):
    from argonne_dt.checkpoint import staging_options

    on_cpu = staging_options()
    assert (on_cpu.use_pinned_memory, on_cpu.use_non_blocking_copy, on_cpu.use_async_staging) == (False, False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = staging_options()
    assert (on_gpu.use_pinned_memory, on_gpu.use_non_blocking_copy, on_gpu.use_async_staging) == (True, True, False)


@pytest.fixture
def fake_world_of_two():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("setting, local_world_size, expected", [
    ("auto", "2", True),    # dp within one node
    ("auto", "1", False),   # dp across nodes
    ("true", "1", True),
    ("false", "2", False),
])
def test_fsdp_reshard_after_forward_reaches_fully_shard(fake_world_of_two, monkeypatch, odd_config, setting,
                                                        local_world_size, expected):
    from argonne_dt import parallelize

    seen, real = [], parallelize.fully_shard

    def fully_shard(module, **kwargs):
        seen.append((type(module).__name__, kwargs.get("reshard_after_forward")))
        return real(module, **kwargs)

    monkeypatch.setattr(parallelize, "fully_shard", fully_shard)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    layout = distributed.build_layout(ParallelConfig(tp=1, dp=2, fsdp_reshard_after_forward=setting), "cpu")
    parallelize.build_model(odd_config, layout, device="meta")
    assert seen == [("Block", expected), ("Block", expected), ("ArgonneModel", None)]
    seen.clear()
    parallelize.build_model(odd_config, layout, device="meta", shard_root=False)  # a teacher: no backward
    assert seen == [("Block", True), ("Block", True)]


def test_selective_op_level_checkpointing_under_compile_is_refused():
    with pytest.raises(ConfigError, match="op-level policy does not see the matmuls inside a compiled block"):
        load_config(None, ["--parallel.compile=true", "--parallel.activation_checkpoint=selective"])
    load_config(None, ["--parallel.compile=true", "--parallel.activation_checkpoint=selective", "--parallel.ac_every=2"])
    load_config(None, ["--parallel.compile=true", "--parallel.activation_checkpoint=full"])

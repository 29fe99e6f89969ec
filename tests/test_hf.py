"""Hugging Face export / import: logits, greedy generation, tokenizer, bit-exact round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file

from argonne_dt.inference import load_model
from argonne_dt.generate import SamplingConfig, generate
from argonne_dt.hf import export_hf, import_hf
from helpers.models import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=11)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return export_hf(checkpoint, tmp_path_factory.mktemp("hf") / "fp32", dtype="fp32")


def test_hugging_face_loads_the_export_and_agrees(checkpoint, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours, _ = load_model(checkpoint)
    tokens = torch.randint(0, 151_665, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 2e-5
    prompt = [[151644, 9707, 11, 1879, 0]]
    ours_greedy = generate(ours, prompt, SamplingConfig(max_new_tokens=20, temperature=0))[0]
    theirs = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None,
                         pad_token_id=151643)[0, 5:].tolist()
    assert ours_greedy == theirs
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    # BOS first, as in training: <|im_start|> "Hello, world!"
    assert tokenizer("Hello, world!")["input_ids"] == [151644, 9707, 11, 1879, 0] and len(tokenizer) == 151_665
    assert tokenizer.decode(tokenizer("Hello, world!")["input_ids"], skip_special_tokens=True) == "Hello, world!"
    generation = json.loads((exported / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (151644, 151645)


def test_export_import_export_is_bit_exact(exported, tmp_path):
    imported = import_hf(exported, tmp_path / "imported")
    again = export_hf(imported, tmp_path / "again", dtype="fp32")
    assert (exported / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert json.loads((exported / "config.json").read_text()) == json.loads((again / "config.json").read_text())


def test_bf16_export_is_sharded_with_an_index(checkpoint, tmp_path):
    out = export_hf(checkpoint, tmp_path / "bf16", dtype="bf16", max_shard_bytes=8 * 2**20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    tensors = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    assert set(tensors) == set(index["weight_map"]) and all(t.dtype == torch.bfloat16 for t in tensors.values())
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out, local_files_only=True).config.head_dim == 16


def test_import_refuses_other_architectures(exported, tmp_path):
    bad = tmp_path / "untied"
    bad.mkdir()
    config = json.loads((exported / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: not an Argonne-shaped Llama: tie_word_embeddings=false"):
        import_hf(bad, tmp_path / "out")


def test_hugging_face_prompting_the_export_continues_as_our_generation(checkpoint, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from argonne_dt.generate import generate_from_checkpoint

    prompts = ["Long long time ago, ", "def main():"]
    ours = generate_from_checkpoint(str(checkpoint), prompts, SamplingConfig(max_new_tokens=12, temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    for prompt, text in zip(prompts, ours):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=151643)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text

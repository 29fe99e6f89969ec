import pytest
import torch

from argonne_dt.config import load_config
from argonne_dt.hf import from_hf_state_dict, llama_config, to_hf_state_dict
from argonne_dt.loss import cross_entropy_loss
from argonne_dt.model import ArgonneModel, seeded_normal_
from helpers.models import odd_model_config


def test_4b9_parameter_count_on_meta_device():
    cfg = load_config("4b9.toml").model
    with torch.device("meta"):
        model = ArgonneModel(cfg)
    assert model.num_parameters() == 4_918_072_800
    block = model.layers[0]
    assert sum(p.numel() for p in block.attn.parameters()) == 44_390_400
    assert sum(p.numel() for p in block.mlp.parameters()) == 134_737_920
    assert model.lm_head.weight is model.embed.weight


def test_flops_per_token_counts_lm_head_and_attention():
    cfg = load_config("4b9.toml").model
    with torch.device("meta"):
        model = ArgonneModel(cfg)
    expected = 6 * 4_918_072_800 + 12 * 24 * 24 * 170 * 4096
    assert model.flops_per_token(4096) == expected


def test_init_statistics():
    model = ArgonneModel(odd_model_config(num_layers=8, hidden_size=340, head_dim=85, init_std=0.02))
    residual = model.layers[0].attn.o_proj.weight
    assert abs(residual.std().item() - 0.02 / 4) < 0.001
    assert abs(model.layers[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_meta_init_matches_direct_init(odd_config):
    direct = ArgonneModel(odd_config)
    direct.init_weights(seed=3)
    with torch.device("meta"):
        lazy = ArgonneModel(odd_config)
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=3)
    for (name, a), (_, b) in zip(direct.state_dict().items(), lazy.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(direct.rope_cos, lazy.rope_cos)
    assert lazy.lm_head.weight is lazy.embed.weight


def test_init_does_not_depend_on_sharding():
    full = torch.empty(600, 10)
    seeded_normal_(full, 0.02, seed=7, offset=(0, 0), full_shape=(600, 10))
    for rows, cols in [((0, 150), (0, 10)), ((150, 451), (0, 10)), ((451, 600), (3, 8)), ((250, 260), (0, 5))]:
        block = torch.empty(rows[1] - rows[0], cols[1] - cols[0])
        seeded_normal_(block, 0.02, seed=7, offset=(rows[0], cols[0]), full_shape=(600, 10))
        assert torch.equal(block, full[rows[0] : rows[1], cols[0] : cols[1]])
    other = torch.empty(600, 10)
    seeded_normal_(other, 0.02, seed=8, offset=(0, 0), full_shape=(600, 10))
    assert not torch.equal(other, full)


def _hf_twin(model: ArgonneModel):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model.config)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


def test_logits_match_hugging_face_llama(odd_config):
    model = ArgonneModel(odd_config).eval()
    hf = _hf_twin(model)
    tokens = torch.randint(0, odd_config.vocab_size, (2, 23))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (2, 23, 1001)
    assert (ours - theirs).abs().max().item() < 2e-5
    # A broken rotary convention or norm would be far outside the tolerance above.
    assert ours.abs().max().item() > 0.1


def test_hf_name_mapping_round_trips(odd_config):
    sd = ArgonneModel(odd_config).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd))
    assert set(back) == set(sd) - {"lm_head.weight"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    hf_sd = to_hf_state_dict(sd)
    hf_sd["lm_head.weight"] = torch.zeros_like(hf_sd["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        from_hf_state_dict(hf_sd)


@pytest.mark.parametrize("pad", [False, True])
def test_kv_cache_decode_equals_full_forward(odd_config, pad):
    odd_config.pad_head_dim = pad
    model = ArgonneModel(odd_config).eval()
    tokens = torch.randint(0, odd_config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_kv_caches(batch=2, max_len=32)
        steps = [model(tokens[:, :7], caches, 0), model(tokens[:, 7:12], caches, 7)]
        steps += [model(tokens[:, i : i + 1], caches, i) for i in range(12, 20)]
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() < 1e-5


def test_padded_head_dim_gives_same_outputs_and_gradients(odd_config):
    plain = ArgonneModel(odd_config)
    padded = ArgonneModel(odd_model_config(pad_head_dim=True))
    padded.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, odd_config.vocab_size, (2, 16))
    losses = []
    for model in (plain, padded):
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), padded.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_bf16_autocast_runs_matmuls_in_bf16(odd_config):
    model = ArgonneModel(odd_config)
    seen = []
    model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 1001, (1, 8)))
    assert seen == [torch.bfloat16] and logits.dtype == torch.bfloat16
    assert model.embed.weight.dtype == torch.float32


def test_fused_lm_head_loss_equals_logits_then_cross_entropy(odd_config):
    model = ArgonneModel(odd_model_config(init_std=0.1))
    tokens = torch.randint(0, odd_config.vocab_size, (3, 21))
    grads, losses = [], []
    for chunk in (0, 7):  # 0: plain logits; 7 does not divide the 60 tokens
        model.zero_grad()
        model.use_loss_path(fused_chunk=chunk)
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(losses[0], cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]), atol=1e-6)
    for name, plain in grads[0].items():
        assert (plain - grads[1][name]).abs().max() <= 1e-5 * plain.abs().max(), name
    with torch.no_grad():  # evaluation: no gradient work, same value
        assert torch.allclose(model(tokens[:, :-1], targets=tokens[:, 1:]), losses[0], atol=1e-6)


def test_kv_cache_is_kept_in_the_compute_dtype(odd_config):
    model = ArgonneModel(odd_config)
    tokens = torch.randint(0, odd_config.vocab_size, (1, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        caches = model.new_kv_caches(batch=1, max_len=8)
        model(tokens, caches, 0)
    assert {c.keys.dtype for c in caches} == {c.values.dtype for c in caches} == {torch.bfloat16}
    assert {c.keys.dtype for c in model.new_kv_caches(batch=1, max_len=8)} == {torch.float32}

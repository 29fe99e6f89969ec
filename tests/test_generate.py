import pytest
import torch

from argonne_dt.generate import SamplingConfig, apply_repetition_penalty, generate, sample_next
from argonne_dt.model import ArgonneModel
from helpers.models import odd_model_config

PROMPTS = [[5, 17, 99, 3, 250], [7], [42, 43, 44, 45, 46, 47, 48, 49]]


@pytest.fixture(scope="module")
def model():
    return ArgonneModel(odd_model_config(init_std=0.2)).eval()


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(max_new_tokens=12, temperature=0),
     SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=3)],
)
def test_kv_cache_generation_equals_full_recomputation(model, sampling):
    cached = generate(model, PROMPTS, sampling)
    recomputed = generate(model, PROMPTS, sampling, recompute=True)
    padded_to_four = generate(model, PROMPTS, sampling, recompute=True, pad_multiple=4)
    assert cached == recomputed == padded_to_four
    assert all(len(out) == 12 for out in cached)


def test_batched_prompts_equal_prompts_alone(model):
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    together = generate(model, PROMPTS, greedy)
    alone = [generate(model, [p], greedy)[0] for p in PROMPTS]
    assert together == alone


def test_greedy_is_the_argmax_of_the_full_forward(model):
    out = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=5, temperature=0))[0]
    sequence = list(PROMPTS[0])
    for token in out:
        with torch.no_grad():
            assert model(torch.tensor([sequence]))[0, -1].argmax().item() == token
        sequence.append(token)


def test_stops_at_eos(model):
    free = generate(model, PROMPTS[:1], SamplingConfig(max_new_tokens=10, temperature=0))[0]
    stopped = generate(model, PROMPTS[:1], SamplingConfig(max_new_tokens=10, temperature=0), eos_id=free[3])[0]
    assert stopped == free[: free.index(free[3]) + 1]


def test_top_k_top_p_and_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g).tolist()) == {0, 1}
    # probabilities 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two, top_p 0.5 only the first
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.8), g).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), g).tolist()) == {0}
    assert set(sample_next(logits, SamplingConfig(temperature=0), g).tolist()) == {0}
    hot = sample_next(logits, SamplingConfig(temperature=100.0), g)
    assert len(set(hot.tolist())) == 5


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    seen = torch.tensor([[0, 1, 3]])
    mask = torch.tensor([[True, True, False]])  # the 3 is padding
    out = apply_repetition_penalty(logits, seen, mask, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]


def test_too_long_request_is_refused(model):
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        generate(model, [[1] * 60], SamplingConfig(max_new_tokens=10))

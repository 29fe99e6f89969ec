import math

import pytest
import torch

from argonne_dt.config import OptimConfig
from argonne_dt.model import ArgonneModel
from argonne_dt.optim import build_optimizer, build_scheduler, clip_grad_norm_, lr_at, parameter_groups
from helpers.models import odd_model_config


def test_schedule_warmup_peak_and_end():
    cfg = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=2000)
    total = 10_000
    assert lr_at(0, cfg, total) == pytest.approx(1e-4 / 2000)
    assert lr_at(999, cfg, total) == pytest.approx(0.5e-4)
    assert lr_at(1999, cfg, total) == pytest.approx(1e-4)  # last warmup step reaches the peak
    assert lr_at(2000, cfg, total) == pytest.approx(1e-4)  # cosine starts at the peak
    middle = 2000 + (total - 1 - 2000) / 2
    assert lr_at(int(middle), cfg, total) == pytest.approx(5.5e-5, rel=1e-3)
    assert lr_at(total - 1, cfg, total) == pytest.approx(1e-5)
    assert lr_at(total + 50, cfg, total) == pytest.approx(1e-5)


def test_scheduler_follows_lr_at():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, fused=False)
    model = ArgonneModel(odd_model_config())
    optimizer = build_optimizer(model, cfg, "cpu")
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, cfg, 10) for s in range(10)])
    assert seen[-1] == pytest.approx(1e-4)


def test_no_weight_decay_on_norms():
    model = ArgonneModel(odd_model_config())
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_clip_uses_the_norm_of_all_gradients():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0])
    total = clip_grad_norm_(params, max_norm=1.0)
    assert total.item() == pytest.approx(5.0)
    assert math.hypot(*params[0].grad[:1], *params[1].grad[1:2]) == pytest.approx(1.0)

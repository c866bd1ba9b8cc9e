"""New layers keep the model's dtype and device."""

import pytest
import torch

from sift_lightning import sparse_targets, transform
from sift_lightning.models.gpt import GPT, gpt_config
from transform_models import MEMBERS, tiny_resnet, user_cnn


@pytest.mark.parametrize("family", MEMBERS)
def test_float64_model_stays_float64(family):
    model = transform(tiny_resnet(dtype=torch.float64), family, 0.5)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64, name
    for name, b in model.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float64, name
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("family", MEMBERS)
def test_float64_gpt_stays_float64(family):
    model = transform(GPT(gpt_config("gpt_tiny"), dtype=torch.float64), family, 0.5)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.parametrize("family", MEMBERS)
def test_meta_stays_meta(family):
    with torch.device("meta"):
        model = user_cnn()
    model = transform(model, family, 0.5)
    assert sparse_targets(model)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}


@pytest.mark.parametrize("family", MEMBERS)
def test_meta_gpt_stays_meta(family):
    model = transform(GPT(gpt_config("gpt_tiny"), device="meta"), family, 0.5)
    assert {p.device.type for p in model.parameters()} == {"meta"}

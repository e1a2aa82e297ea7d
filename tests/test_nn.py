"""fastdistil.nn: the module wrappers give exactly the functional ops' results and validate their settings."""

import pytest
import torch

import fastdistil


def test_kd_loss_module_matches_functional():
    s, t = torch.randn(2, 5, 40, requires_grad=True), torch.randn(2, 5, 40)
    mask = torch.rand(2, 5) > 0.3
    module = fastdistil.KDLoss(temperature=4.0, reduction="sum", scale_t2=False)
    torch.testing.assert_close(module(s, t, mask), fastdistil.kd_loss(s, t, 4.0, mask, "sum", False), rtol=0, atol=0)
    assert "temperature=4.0" in repr(module)


def test_cosine_loss_module_matches_functional():
    s, t = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    torch.testing.assert_close(fastdistil.CosineLoss()(s, t), fastdistil.cosine_loss(s, t), rtol=0, atol=0)


def test_modules_reject_bad_settings():
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        fastdistil.KDLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastdistil.KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastdistil.CosineLoss(reduction="batchmean")

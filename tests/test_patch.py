"""fastdistil.patch_model on transformers BERT and DistilBERT (MLM heads and bare encoders): same outputs and
gradients as the unpatched models, the op really runs in every layer, dropout follows train/eval mode, the
patch survives save/load without leaking into the checkpoint, and what cannot be patched is refused."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertModel,
)

import fastdistil
from fastdistil import patch as fd_patch
from tests.conftest import DEVICES

L = 23


def _bert(cls=BertForMaskedLM, **kw):
    cfg = BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
        max_position_embeddings=64, **kw,
    )  # fmt: skip
    return cls(cfg)


def _distilbert(cls=DistilBertForMaskedLM, **kw):
    cfg = DistilBertConfig(
        vocab_size=97, dim=64, n_layers=2, n_heads=2, hidden_dim=96, max_position_embeddings=64, **kw
    )
    return cls(cfg)


MODELS = {
    "bert-mlm": _bert,
    "bert": lambda: _bert(BertModel),
    "distilbert-mlm": _distilbert,
    "distilbert": lambda: _distilbert(DistilBertModel),
}


def _batch(device):
    ids = torch.randint(0, 97, (3, L), device=device)
    mask = torch.ones(3, L, dtype=torch.long, device=device)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    return ids, mask


def _out(model, ids, mask):
    o = model(input_ids=ids, attention_mask=mask)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _loss_and_grads(model, ids, mask):
    """A loss over the real (non-padding) positions only, and every parameter's gradient."""
    model.zero_grad()
    out = _out(model, ids, mask)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], device=out.device))[mask.bool()].square().mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "varlen"])
def test_patched_model_matches_eager_outputs_and_gradients(name, unpad, device):
    model = MODELS[name]().to(device).eval()
    ids, mask = _batch(device)
    model.set_attn_implementation("eager")
    ref, ref_grads = _loss_and_grads(model, ids, mask)
    fastdistil.patch_model(model, unpad=unpad)
    assert fastdistil.is_patched(model)
    out, grads = _loss_and_grads(model, ids, mask)
    keep = mask.bool()
    if unpad:  # padded query positions are zeros there (never used); every real position must match
        torch.testing.assert_close(out[keep], ref[keep], atol=2e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=2e-5, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "varlen"])
def test_the_op_runs_in_every_layer(monkeypatch, unpad):
    calls = []
    for fn in ("attention", "attention_varlen"):
        real = getattr(fd_patch, fn)
        monkeypatch.setattr(
            fd_patch, fn, lambda *a, _real=real, _fn=fn, **kw: calls.append((_fn, kw)) or _real(*a, **kw)
        )
    model = fastdistil.patch_model(_distilbert().train(), unpad=unpad)
    _out(model, *_batch("cpu"))
    assert [c[0] for c in calls] == ["attention_varlen" if unpad else "attention"] * 2
    assert all(kw["dropout_p"] == model.config.attention_dropout for _, kw in calls)  # training: dropout on
    calls.clear()
    model.eval()
    _out(model, *_batch("cpu"))
    assert len(calls) == 2 and all(kw["dropout_p"] == 0.0 for _, kw in calls)  # eval: off


def test_dropout_in_training_is_reproducible_and_off_in_eval():
    model = fastdistil.patch_model(_bert(attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.0))
    ids, mask = _batch("cpu")
    model.eval()
    clean = _out(model, ids, mask)
    model.train()
    torch.manual_seed(0)
    a = _out(model, ids, mask)
    torch.manual_seed(0)
    b = _out(model, ids, mask)
    c = _out(model, ids, mask)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, clean)
    a.square().mean().backward()  # the backward regenerates the same mask: finite gradients everywhere
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unpatch_and_save_load(tmp_path):
    model = _bert()
    before = model.config._attn_implementation
    fastdistil.patch_model(model)
    fastdistil.patch_model(model, unpad=True)  # patching twice keeps the original to return to
    model.save_pretrained(tmp_path)
    assert "fastdistil" not in (tmp_path / "config.json").read_text()  # checkpoints stay plain transformers
    reloaded = BertForMaskedLM.from_pretrained(tmp_path)
    assert not fastdistil.is_patched(reloaded)
    fastdistil.unpatch_model(model)
    assert model.config._attn_implementation == before and not fastdistil.is_patched(model)


def test_decoders_and_non_models_are_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        fastdistil.patch_model(_bert(is_decoder=True))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastdistil.patch_model(torch.nn.Linear(2, 2))

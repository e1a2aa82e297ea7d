"""fastdistil.MLMDistiller on transformers models: the same losses and student gradients as running both models'
own MLM heads (full logits) and the DistilBERT distiller's formulation, without computing any full logits."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fastdistil  # noqa: E402
from fastdistil.ops import op_module  # noqa: E402

V = 211


def _bert(layers, hidden=32):
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertForMaskedLM(cfg).eval()


def _distilbert(layers, hidden=32):
    cfg = transformers.DistilBertConfig(
        vocab_size=V, dim=hidden, n_layers=layers, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    return transformers.DistilBertForMaskedLM(cfg).eval()


def _batch(B=3, L=11):
    input_ids = torch.randint(0, V, (B, L))
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    labels = torch.where(torch.rand(B, L) < 0.3, input_ids, -100)
    labels[attention_mask == 0] = -100
    labels[0, 0] = input_ids[0, 0]
    return input_ids, attention_mask, labels


def _reference(student, teacher, input_ids, attention_mask, labels, temperature, restrict):
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    s_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    rows = attention_mask.bool()
    kl_rows = labels != -100 if restrict else rows
    loss_ce = op_module("kd_loss").kd_loss_ref(s_out.logits, t_out.logits, temperature, kl_rows)
    loss_mlm = F.cross_entropy(s_out.logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    loss_cos = op_module("cosine_loss").cosine_loss_ref(s_out.hidden_states[-1], t_out.hidden_states[-1], rows)
    return loss_ce, loss_mlm, loss_cos


@pytest.mark.parametrize("student_kind", ["bert", "distilbert"])
@pytest.mark.parametrize("restrict", [False, True], ids=["attention_rows", "restrict_ce_to_mask"])
def test_distiller_matches_full_logits(student_kind, restrict):
    teacher = _bert(4)
    student = _bert(2) if student_kind == "bert" else _distilbert(2)
    batch = _batch()
    alphas = dict(alpha_ce=5.0, alpha_mlm=2.0)
    distiller = fastdistil.MLMDistiller(student, teacher, temperature=2.0, restrict_ce_to_mask=restrict, **alphas)
    assert all(p.requires_grad for p in distiller.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in distiller.parameters()} == {id(p) for p in student.parameters()}

    out = distiller(*batch)
    (5.0 * out.loss_ce + 2.0 * out.loss_mlm + out.loss_cos).backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    ref = _reference(student, teacher, *batch, 2.0, restrict)
    (5.0 * ref[0] + 2.0 * ref[1] + ref[2]).backward()
    for name, a, b in zip(("loss_ce", "loss_mlm", "loss_cos"), (out.loss_ce, out.loss_mlm, out.loss_cos), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert out.loss_ce.item() > 0 and out.loss_mlm.item() > 0
    for name, p in student.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_distiller_never_computes_full_logits(monkeypatch):
    """The models' own vocabulary projections never run on the batch (only inside the fused head, by chunk)."""
    teacher, student = _bert(2), _distilbert(2)
    distiller = fastdistil.MLMDistiller(student, teacher, chunk_size=4)
    calls = []
    for model in (teacher.cls.predictions.decoder, student.vocab_projector):
        model.register_forward_hook(lambda *a: calls.append(1))
    out = distiller(*_batch())
    (5.0 * out.loss_ce + 2.0 * out.loss_mlm).backward()
    assert calls == []


def test_mlm_parts_refuses_models_without_mlm_head():
    encoder = transformers.BertModel(_bert(1).config)
    with pytest.raises(TypeError, match="no masked-LM head"):
        fastdistil.mlm_parts(encoder)

"""Layer-wise distillation and narrower students: the taps see what transformers computes; loss_hidden,
loss_attention and loss_relation against float64 references built from transformers' own outputs (hidden states,
eager attention probabilities), values and gradients; narrower students (reduce and random initialisation) train,
checkpoint, resume bit-identically with their projection, and save as plain transformers models; bad shapes and
flags are one clear error."""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdistil import checkpoint as fd_checkpoint  # noqa: E402
from fastdistil import models as fd_models  # noqa: E402
from fastdistil import narrow  # noqa: E402
from fastdistil import train as fd_train  # noqa: E402
from fastdistil.errors import UsageError  # noqa: E402
from fastdistil.objectives import HiddenStateObjective  # noqa: E402
from fastdistil.objectives.layerwise import (  # noqa: E402
    LayerwiseObjective,
    LayerwiseSpec,
    parse_layer_map,
    uniform_layer_map,
)
from fastdistil.objectives.taps import Taps  # noqa: E402
from tests.test_resume import _assert_same_weights, _losses  # noqa: E402
from tests.test_train import _args, _interrupt_on_call  # noqa: E402


def _bert(hidden=32, layers=4, heads=4, ffn=64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64,
                                  initializer_range=0.3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _batch(B=3, L=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


def _objective(student, teacher, **spec):
    base = HiddenStateObjective(student, teacher, alpha_cos=0.0)
    n_s, n_t = fd_models.num_layers(student), fd_models.num_layers(teacher)
    spec.setdefault("layer_map", uniform_layer_map(n_s, n_t))
    return LayerwiseObjective(base, LayerwiseSpec(**spec))


def _outputs(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)


def _atol(reference_grad):
    """fp32 against float64 through a whole model: 1e-5 of the gradient's largest entry, at least 1e-7 (a key bias
    gets an exactly-zero gradient from a softmax over keys, which fp32 rounding leaves at ~1e-8)."""
    return max(1e-5 * reference_grad.abs().max().item(), 1e-7)


def _kl_rows(p_log, q_log, mask):
    """Mean over (batch, head, real query rows) of KL(p || q), from log-probabilities (B, heads, L, L) in float64."""
    p = p_log.exp()
    kl = torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)  # masked keys: p = 0 adds 0 (and no NaN gradient)
    rows = mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].mean()


def test_taps_see_what_transformers_computes():
    model = _bert()
    ids, mask = _batch()
    taps = Taps(model, hidden=[0, 2, 4], projections={1: ("q", "k", "v")})
    out = _outputs(model, ids, mask)
    for i in (0, 2, 4):
        torch.testing.assert_close(taps.hidden[i], out.hidden_states[i], rtol=0, atol=0)
    att = model.encoder.layer[1].attention.self
    x = out.hidden_states[1]
    for name, lin in (("q", att.query), ("k", att.key), ("v", att.value)):
        torch.testing.assert_close(taps.qkv[1][name], lin(x))
    taps.clear()
    assert not taps.hidden and not taps.qkv
    taps.remove()
    model(input_ids=ids, attention_mask=mask)
    assert not taps.hidden


def test_attention_term_matches_transformers_attention_maps_in_float64():
    """loss_attention against the attention probabilities transformers' eager attention returns (float64 models),
    and its gradient against autograd through those probabilities."""
    teacher, student = _bert(layers=4, seed=0), _bert(layers=2, seed=1)
    ids, mask = _batch()
    objective = _objective(student, teacher, alpha_attention=1.0)
    terms = objective.terms(ids, mask, None)
    loss = terms["loss_attention"]
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    s_att, t_att = _outputs(s64, ids, mask).attentions, _outputs(t64, ids, mask).attentions
    pairs = [(1, 2), (2, 4)]  # uniform map: student layer m -> teacher layer 2m
    logs = [a.clamp_min(1e-300).log() for a in s_att]  # masked keys have probability 0 exactly
    ref = sum(_kl_rows(t_att[t - 1].clamp_min(1e-300).log(), logs[s - 1], mask) for s, t in pairs) / len(pairs)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    ref.backward()
    for n, p in s64.named_parameters():
        if n in ours:
            torch.testing.assert_close(ours[n].double(), p.grad, rtol=1e-4, atol=_atol(p.grad), msg=n)
    assert any(g.abs().max() > 0 for g in ours.values())


def _relation_reference(student, teacher, ids, mask, R, layers):
    """MiniLMv2's relation loss in float64 from transformers' hidden states and the layers' own projections."""
    total = 0.0
    for (model, layer), side in zip(((student, layers[0]), (teacher, layers[1])), ("s", "t")):
        x = _outputs(model, ids, mask).hidden_states[layer]
        att = model.encoder.layer[layer].attention.self
        rel = {}
        for name, lin in (("q", att.query), ("k", att.key), ("v", att.value)):
            y = lin(x)
            B, L, H = y.shape
            y = y.view(B, L, R, H // R).transpose(1, 2)
            scores = y @ y.transpose(-1, -2) / math.sqrt(H // R)
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], -math.inf)
            rel[name] = scores.log_softmax(-1)
        if side == "s":
            student_rel = rel
        else:
            teacher_rel = rel
    for name in ("q", "k", "v"):
        total = total + _kl_rows(teacher_rel[name], student_rel[name], mask)
    return total


@pytest.mark.parametrize("widths", [(32, 32), (16, 32)], ids=["same-width", "narrower"])
def test_relation_term_matches_a_float64_reference(widths):
    hs, ht = widths
    teacher, student = _bert(hidden=ht, layers=4, seed=0), _bert(hidden=hs, layers=2, heads=2, seed=1)
    ids, mask = _batch()
    objective = _objective(student, teacher, alpha_relation=1.0, relation_heads=4, relation_layers=(-1, 2))
    loss = objective.terms(ids, mask, None)["loss_relation"]
    loss.backward()
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ref = _relation_reference(s64, t64, ids, mask, 4, (1, 2))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    ref.backward()
    for (n, p), (_, p64) in zip(student.named_parameters(), s64.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=_atol(p64.grad), msg=n)


@pytest.mark.parametrize("hidden_loss", ["mse", "cosine"])
def test_hidden_term_through_the_projection_matches_a_float64_reference(hidden_loss):
    teacher, student = _bert(hidden=32, layers=4, seed=0), _bert(hidden=16, layers=2, heads=2, seed=1)
    ids, mask = _batch()
    objective = _objective(student, teacher, alpha_hidden=1.0, hidden_loss=hidden_loss)
    assert objective.trainable() is not None and objective.trainable().weight.shape == (32, 16)
    loss = objective.terms(ids, mask, None)["loss_hidden"]
    loss.backward()
    W = objective.trainable().weight.detach().double().requires_grad_()
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    hs, ht = _outputs(s64, ids, mask).hidden_states, _outputs(t64, ids, mask).hidden_states
    rows = mask.bool()
    per_pair = []
    for s, t in ((0, 0), (1, 2), (2, 4)):
        a, b = (hs[s] @ W.T)[rows], ht[t][rows]
        if hidden_loss == "mse":
            per_pair.append((a - b).square().mean())
        else:
            per_pair.append((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-6)).mean())
    ref = torch.stack(per_pair).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    ref.backward()
    torch.testing.assert_close(objective.trainable().weight.grad.double(), W.grad, rtol=1e-4, atol=_atol(W.grad))


def test_layer_maps():
    assert uniform_layer_map(3, 6) == ((0, 0), (1, 2), (2, 4), (3, 6))
    assert uniform_layer_map(4, 12) == ((0, 0), (1, 3), (2, 6), (3, 9), (4, 12))
    assert parse_layer_map("0:0, 2:6", 3, 6) == ((0, 0), (2, 6))
    for bad, match in (("0:0,1", "pairs"), ("4:2", "outside"), ("1:2,1:3", "twice"), ("a:b", "pairs")):
        with pytest.raises(UsageError, match=match):
            parse_layer_map(bad, 3, 6)


def test_shape_errors_are_clear():
    teacher, student = _bert(hidden=32, heads=4), _bert(hidden=16, layers=2, heads=2)
    with pytest.raises(UsageError, match="heads"):
        _objective(student, teacher, alpha_attention=1.0)
    with pytest.raises(UsageError, match="must divide both"):
        _objective(student, teacher, alpha_relation=1.0, relation_heads=3)
    with pytest.raises(UsageError, match="relation_layers"):
        _objective(student, teacher, alpha_relation=1.0, relation_heads=4, relation_layers=(5, 0))


def test_reduce_keeps_the_teacher_when_nothing_is_reduced_and_slices_when_it_is():
    teacher = _bert(hidden=32, layers=4, heads=4, ffn=64)
    same = narrow.narrow_student(teacher, [0, 3], narrow.narrow_config(teacher, 2, 32, 4, 64), "reduce")
    deep = fd_models.student_from_teacher(teacher, [0, 3])
    _assert_same_weights(same.state_dict(), deep.state_dict())
    small = narrow.narrow_student(teacher, [0, 3], narrow.narrow_config(teacher, 2, 16, None, 24), "reduce")
    assert small.config.hidden_size == 16 and small.config.num_attention_heads == 2
    assert small.config.intermediate_size == 24
    keep = narrow._kept_indices(deep, small.config)
    w = deep.state_dict()["encoder.layer.1.intermediate.dense.weight"]
    expected = w[keep[("ffn", 1)]][:, keep["hid"]]
    torch.testing.assert_close(small.state_dict()["encoder.layer.1.intermediate.dense.weight"], expected)
    with pytest.raises(UsageError, match="whole heads"):
        narrow.narrow_student(teacher, [0, 3], narrow.narrow_config(teacher, 2, 16, 4, 24), "reduce")
    rand = narrow.narrow_student(teacher, [0, 3], narrow.narrow_config(teacher, 2, 16, 4, 24), "random")
    assert rand.config.num_attention_heads == 4


NARROW = ["--student_layers", "0,3", "--student_hidden_size", "16", "--alpha_hidden", "1", "--alpha_relation",
          "1", "--relation_heads", "4"]  # fmt: skip
STEPS = ["--max_steps", "8", "--checkpoint_interval", "3", "--learning_rate", "2e-3", "--batch_size", "4"]


@pytest.mark.parametrize("init", ["reduce", "random"])
def test_narrow_student_trains_resumes_bit_identically_and_saves_as_plain_transformers(tmp_path, monkeypatch,
                                                                                         init):  # fmt: skip
    from tests.test_train import _teacher

    teacher = _teacher(tmp_path, mlm=True)
    args = [*NARROW, "--student_init", init, *STEPS]
    run = lambda name, *extra: fd_train.train(fd_train.resolve_config(_args(tmp_path, teacher, name, *args, *extra)))  # noqa: E731
    assert run("straight").exit_code == 0
    _interrupt_on_call(monkeypatch, 5)
    assert run("resumed").exit_code == 130
    monkeypatch.undo()
    state = fd_checkpoint.load_state(fd_checkpoint.complete(tmp_path / "resumed")[0])
    assert state["objective"]["weight"].shape == (32, 16)  # the projection is checkpointed
    assert run("resumed", "--resume").exit_code == 0
    straight = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "straight" / "student")
    resumed = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "resumed" / "student")
    _assert_same_weights(straight.state_dict(), resumed.state_dict())
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")
    assert straight.config.hidden_size == 16 and straight.config.num_hidden_layers == 2
    _, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "straight" / "student",
                                                                output_loading_info=True)  # fmt: skip
    assert not any(info.values()), info  # nothing missing or unexpected: the projection is not in the student


def test_task_jobs_refuse_shape_and_layer_flags():
    from fastdistil.config import resolve
    from fastdistil.tasks.job import check_flags

    for flag, value in (("alpha_relation", 1.0), ("student_hidden_size", 256), ("layer_map", "0:0")):
        c = resolve({"task": "sequence-classification", flag: value})
        with pytest.raises(UsageError, match="not supported with --task"):
            check_flags(c)


def test_relations_alone_and_attention_maps_train(tmp_path):
    """A recipe of layer-wise terms only (no loss_cos) is a recipe, not "every loss weight is 0"; attention maps
    run through the trainer with the teacher's head count."""
    from tests.test_train import _teacher

    teacher = _teacher(tmp_path, mlm=False)
    for name, extra in (("rel", ["--alpha_cos", "0", "--alpha_relation", "1"]),
                        ("att", ["--alpha_attention", "1", "--layer_map", "0:0,1:2,2:4"])):  # fmt: skip
        c = fd_train.resolve_config(_args(tmp_path, teacher, name, "--max_steps", "2", "--student_layers", "0,3",
                                          *extra))  # fmt: skip
        assert fd_train.train(c).exit_code == 0
        last = [x for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
        assert ("loss_relation" if name == "rel" else "loss_attention") in last


def test_default_relation_heads_divide_both_widths():
    from fastdistil.objectives import default_relation_heads

    teacher = _bert(hidden=32, heads=4)
    assert default_relation_heads(_bert(hidden=16, layers=2, heads=2), teacher) == 4  # the teacher's head count
    assert default_relation_heads(_bert(hidden=18, layers=2, heads=3), teacher) == 2  # the largest common divisor

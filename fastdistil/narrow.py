"""Students narrower than their teacher (hidden size, heads, FFN), with the teacher's vocabulary and tokenizer.

Two initialisations (--student_init):
    random  transformers' own initialisation of the narrow config.
    reduce  the teacher's weights, reduced to the student's shape: its --student_layers, and in them
              - the hidden dimensions (the residual stream, shared by every layer) with the largest sum of |gamma|
                over all the teacher's LayerNorms: the dimensions the normalised stream carries most strongly;
              - per layer, the attention heads with the largest weight norm (their rows of Q, K, V and columns of
                the output projection; fastdistil.shrink.head_importance), whole heads, so the student's head
                size must be the teacher's;
              - per layer, the FFN neurons with the largest norm of their input row times their output column;
            every weight is the teacher's, sliced to those indices (kept in the teacher's order). LayerNorms then
            normalise over fewer dimensions, so the start is an approximation that training corrects.
BERT-style checkpoints (BERT, RoBERTa, ELECTRA, ... parameter names) can be reduced; others train from random.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from fastdistil.errors import UsageError
from fastdistil.models import ModelError, hidden_size, num_layers, student_from_teacher, tied_keys
from fastdistil.shrink import head_importance

# Parameter name -> (index set of dim 0, of dim 1): "hid" the kept hidden dimensions, "att" the kept heads' dims of
# that layer, "ffn" its kept neurons, None every index. First match wins (attention.output before output).
_RULES = [
    (r"embeddings\.\w+_embeddings\.weight$", (None, "hid")),
    (r"LayerNorm\.(weight|bias)$", ("hid",)),
    (r"attention\.self\.(query|key|value)\.weight$", ("att", "hid")),
    (r"attention\.self\.(query|key|value)\.bias$", ("att",)),
    (r"attention\.output\.dense\.weight$", ("hid", "att")),
    (r"intermediate\.dense\.weight$", ("ffn", "hid")),
    (r"intermediate\.dense\.bias$", ("ffn",)),
    (r"layer\.\d+\.output\.dense\.weight$", ("hid", "ffn")),
    (r"(pooler|transform)\.dense\.weight$", ("hid", "hid")),
    (r"\.dense\.bias$", ("hid",)),
    (r"decoder\.weight$", (None, "hid")),
    (r"(decoder\.bias|predictions\.bias)$", (None,)),
]
_LAYER = re.compile(r"\blayer\.(\d+)\.")
REDUCIBLE = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


def narrow_config(teacher: nn.Module, n_layers: int, hidden: int | None, heads: int | None, ffn: int | None):
    """The teacher's config with the student's depth and widths (defaults: heads of the teacher's head size,
    FFN 4 x hidden)."""
    t = teacher.config
    t_hidden, t_heads = hidden_size(teacher), t.num_attention_heads
    hidden = hidden or t_hidden
    heads = heads or max(1, hidden // (t_hidden // t_heads))
    if hidden % heads:
        raise UsageError(f"--student_hidden_size {hidden} is not a multiple of --student_num_heads {heads}")
    config = copy.deepcopy(t)
    config.num_hidden_layers, config.hidden_size, config.num_attention_heads = n_layers, hidden, heads
    config.intermediate_size = ffn or 4 * hidden
    return config


def narrow_student(teacher: nn.Module, layers: list[int], config, init: str) -> nn.Module:
    """A student of `config`'s shape, initialised from the teacher's `layers` ("reduce") or at random."""
    if init == "random":
        return type(teacher)(config).train()
    if teacher.config.model_type not in REDUCIBLE:
        raise UsageError(f"--student_init reduce knows BERT-style parameter names ({', '.join(REDUCIBLE)}), not "
                         f"{teacher.config.model_type}; use --student_init random")  # fmt: skip
    t_head = hidden_size(teacher) // teacher.config.num_attention_heads
    s_head = config.hidden_size // config.num_attention_heads
    if s_head != t_head:
        raise UsageError(f"--student_init reduce keeps whole heads: the student's head size {s_head} (hidden "
                         f"{config.hidden_size} / {config.num_attention_heads} heads) must be the teacher's {t_head}; "
                         "change --student_num_heads or use --student_init random")  # fmt: skip
    deep = student_from_teacher(teacher, layers)  # the chosen layers at the teacher's width
    keep = _kept_indices(deep, config)
    student = type(teacher)(config)
    state = {k: _slice(k, v, keep) for k, v in deep.state_dict().items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_keys(student)]
    if missing or unexpected:
        raise ModelError(f"cannot reduce the teacher to the student: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    student.tie_weights()
    return student.train()


def _kept_indices(model: nn.Module, config) -> dict:
    """{"hid": indices, ("att", layer): indices, ("ffn", layer): indices}, each sorted."""
    gammas = [m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.LayerNorm)]
    keep = {"hid": _top(torch.stack(gammas).sum(0), config.hidden_size)}
    d = hidden_size(model) // model.config.num_attention_heads
    for layer, importance in enumerate(head_importance(model)):
        heads = _top(importance, config.num_attention_heads)
        keep[("att", layer)] = (heads[:, None] * d + torch.arange(d)).reshape(-1)
    state = model.state_dict()
    for layer in range(num_layers(model)):
        prefix = next(k for k in state if k.endswith(f"layer.{layer}.intermediate.dense.weight"))[: -len("weight")]
        w_in = state[prefix + "weight"]
        w_out = state[prefix.replace("intermediate", "output") + "weight"]
        keep[("ffn", layer)] = _top(w_in.norm(dim=1) * w_out.norm(dim=0), config.intermediate_size)
    return keep


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    if k > score.numel():
        raise UsageError(f"the student asks for {k} of only {score.numel()} teacher units (a student cannot be wider)")
    return score.float().topk(k).indices.sort().values


def _slice(name: str, value: torch.Tensor, keep: dict) -> torch.Tensor:
    for pattern, kinds in _RULES:
        if re.search(pattern, name):
            m = _LAYER.search(name)
            out = value
            for dim, kind in enumerate(kinds):
                if kind is not None:
                    index = keep[kind] if kind == "hid" else keep[(kind, int(m.group(1)))]
                    out = out.index_select(dim, index)
            return out.clone()
    return value.clone()

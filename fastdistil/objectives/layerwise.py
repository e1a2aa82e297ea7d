"""Layer-wise distillation terms on top of any base recipe (the DistilBERT triple loss, hidden states, ...):

    loss_hidden     TinyBERT's hidden-state loss: for each (student index, teacher index) pair of the layer map
                    (0 = the embedding output, m = the output of layer m), the MSE (or 1 - cosine) between the
                    student's hidden states, through the learned projection W (H_s -> H_t) when the widths differ,
                    and the teacher's, over real tokens; the mean over the pairs.
    loss_attention  TinyBERT's attention maps, KL variant: per mapped layer pair (embeddings excluded), per head and
                    real query row, KL(softmax(Q_t K_t^T / sqrt(d_t)) || softmax(Q_s K_s^T / sqrt(d_s))) over real
                    keys; the mean over heads and rows, then over the pairs. Same head count on both sides.
    loss_relation   MiniLMv2's self-attention relations: Q, K and V of one student layer and one teacher layer, each
                    split into R relation heads of width H/R; per relation, per head and real query row,
                    KL(softmax(X_t X_t^T / sqrt(H_t/R)) || softmax(X_s X_s^T / sqrt(H_s/R))); the mean over heads and
                    rows, summed over Q-Q, K-K, V-V. Any widths.
    loss_cos        when the widths differ, the base recipe's cosine on the last hidden states, through W.

The attention and relation terms go through fastdistil.ops.relation_kl: no L x L map of either model is stored.
W is training state (optimised, checkpointed and resumed with the student) and is not part of the saved student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastdistil.errors import UsageError
from fastdistil.models import hidden_size, num_layers
from fastdistil.objectives.base import Objective
from fastdistil.objectives.taps import PROJECTIONS, Taps
from fastdistil.ops import cosine_loss, relation_kl
from fastdistil.padding import row_mask as real_rows

HIDDEN_LOSSES = ("mse", "cosine")


@dataclass(frozen=True)
class LayerwiseSpec:
    layer_map: tuple  # ((student hidden index, teacher hidden index), ...); 0 = embeddings
    alpha_hidden: float = 0.0
    hidden_loss: str = "mse"
    alpha_attention: float = 0.0
    alpha_relation: float = 0.0
    relation_heads: int = 12
    relation_layers: tuple = (-1, -1)  # (student layer, teacher layer), 0-based; negative counts from the last
    alpha_cos: float = 0.0  # the last hidden states through W (used when the widths differ)

    @property
    def active(self) -> bool:
        return bool(self.alpha_hidden or self.alpha_attention or self.alpha_relation or self.alpha_cos)


def uniform_layer_map(n_student: int, n_teacher: int) -> tuple:
    """TinyBERT's g(m) = m * N / M: embeddings to embeddings, student layer m to teacher layer m * N / M (rounded),
    so the last layers meet (3 of 6: 1->2, 2->4, 3->6)."""
    return ((0, 0),) + tuple((m, round(m * n_teacher / n_student)) for m in range(1, n_student + 1))


def parse_layer_map(text: str, n_student: int, n_teacher: int) -> tuple:
    """'0:0,1:2,3:6' -> ((0, 0), (1, 2), (3, 6)), checked against both depths (0 = embeddings)."""
    pairs = []
    for item in text.replace(" ", "").split(","):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError as e:
            raise UsageError(f"--layer_map {text!r}: expected student:teacher pairs such as 0:0,1:2,3:6") from e
        if not (0 <= s <= n_student and 0 <= t <= n_teacher):
            raise UsageError(f"--layer_map {text!r}: {item} is outside the student's 0..{n_student} or the teacher's "
                             f"0..{n_teacher} (0 = the embeddings, m = the output of layer m)")  # fmt: skip
        pairs.append((s, t))
    if len({s for s, _ in pairs}) != len(pairs):
        raise UsageError(f"--layer_map {text!r}: a student layer is mapped twice")
    return tuple(pairs)


def parse_relation_layers(text: str) -> tuple[int, int]:
    """'-1:-1' -> (-1, -1): the student's and the teacher's layer of the relations (0-based; negative from the end)."""
    try:
        s, t = (int(x) for x in text.replace(" ", "").split(":"))
    except ValueError as e:
        raise UsageError(f"--relation_layers {text!r}: expected student:teacher layer indices such as -1:-1") from e
    return s, t


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H) -> (B, heads, L, H / heads), a view."""
    B, L, H = x.shape
    return x.view(B, L, heads, H // heads).transpose(1, 2)


def masked_mse(student: Tensor, teacher: Tensor, rows: Tensor) -> Tensor:
    """Mean squared error over the real tokens' elements (fp32)."""
    sq = (student.float() - teacher.float()).square().sum(-1)
    return (sq * rows).sum() / (rows.sum() * student.shape[-1]).clamp_min(1)


class LayerwiseObjective(Objective):
    """`base`'s terms plus the layer-wise ones of `spec`. Pass the base recipe with alpha_cos 0 when the widths
    differ: loss_cos then comes from here, through W."""

    def __init__(self, base: Objective, spec: LayerwiseSpec):
        student, teacher = base.student, base.teacher
        weights = dict(base.weights, loss_hidden=spec.alpha_hidden, loss_attention=spec.alpha_attention,
                       loss_relation=spec.alpha_relation)  # fmt: skip
        if spec.alpha_cos:
            weights["loss_cos"] = spec.alpha_cos
        super().__init__(student, teacher, weights)
        self.base, self.spec, self.needs = base, spec, base.needs
        hs, ht = hidden_size(student), hidden_size(teacher)
        self.projection = None
        if hs != ht and (spec.alpha_hidden or spec.alpha_cos):
            self.projection = nn.Linear(hs, ht, bias=False).to(next(student.parameters()).device)
        self.relation_layers = _relation_layers(spec, num_layers(student), num_layers(teacher))
        _check_heads(self, student, teacher)
        self.s_taps, self.t_taps = (Taps(m, **self._tap_plan(side)) for side, m in ((0, student), (1, teacher)))

    def trainable(self) -> nn.Module | None:
        return self.projection

    def _tap_plan(self, side: int) -> dict:
        spec = self.spec
        hidden = [pair[side] for pair in spec.layer_map] if spec.alpha_hidden else []
        if spec.alpha_cos:
            hidden.append(num_layers(self.student if side == 0 else self.teacher))
        projections: dict = {}
        if spec.alpha_attention:
            for pair in self._attention_pairs():
                projections.setdefault(pair[side] - 1, set()).update(("q", "k"))
        if spec.alpha_relation:
            projections.setdefault(self.relation_layers[side], set()).update(PROJECTIONS)
        return {"hidden": hidden, "projections": projections}

    def _attention_pairs(self) -> list:
        return [(s, t) for s, t in self.spec.layer_map if s > 0 and t > 0]

    def terms(self, input_ids: Tensor, attention_mask: Tensor, labels) -> dict[str, Tensor]:
        try:
            terms = self.base.terms(input_ids, attention_mask, labels)
            mask = attention_mask.bool()
            terms.update(self.layer_terms(mask))
            return terms
        finally:
            self.s_taps.clear()
            self.t_taps.clear()

    def layer_terms(self, mask: Tensor) -> dict[str, Tensor]:
        spec, out = self.spec, {}
        if spec.alpha_hidden:
            out["loss_hidden"] = torch.stack([self._hidden_term(s, t, mask) for s, t in spec.layer_map]).mean()
        if spec.alpha_cos:
            last_s, last_t = num_layers(self.student), num_layers(self.teacher)
            s, t = self._projected(self.s_taps.hidden[last_s]), self.t_taps.hidden[last_t]
            out["loss_cos"] = cosine_loss(s, t.to(s.dtype), real_rows(mask))
        if spec.alpha_attention:
            out["loss_attention"] = torch.stack([self._attention_term(s, t, mask)
                                                 for s, t in self._attention_pairs()]).mean()  # fmt: skip
        if spec.alpha_relation:
            out["loss_relation"] = self._relation_term(mask)
        return out

    def _projected(self, hidden: Tensor) -> Tensor:
        return hidden if self.projection is None else self.projection(hidden)

    def _hidden_term(self, s_index: int, t_index: int, mask: Tensor) -> Tensor:
        s = self._projected(self.s_taps.hidden[s_index])
        t = self.t_taps.hidden[t_index].to(s.dtype)
        if self.spec.hidden_loss == "cosine":
            return cosine_loss(s, t, real_rows(mask))
        return masked_mse(s, t, mask)

    def _attention_term(self, s_index: int, t_index: int, mask: Tensor) -> Tensor:
        sq, tq = self.s_taps.qkv[s_index - 1], self.t_taps.qkv[t_index - 1]
        hs, ht = self.student.config.num_attention_heads, self.teacher.config.num_attention_heads
        s = [split_heads(sq[n], hs) for n in ("q", "k")]
        t = [split_heads(tq[n].to(sq["q"].dtype), ht) for n in ("q", "k")]
        return relation_kl(s[0], s[1], t[0], t[1], mask)

    def _relation_term(self, mask: Tensor) -> Tensor:
        R = self.spec.relation_heads
        sq, tq = self.s_taps.qkv[self.relation_layers[0]], self.t_taps.qkv[self.relation_layers[1]]
        total = 0.0
        for name in PROJECTIONS:
            s = split_heads(sq[name], R)
            t = split_heads(tq[name].to(s.dtype), R)
            total = total + relation_kl(s, s, t, t, mask)
        return total


def _relation_layers(spec: LayerwiseSpec, n_student: int, n_teacher: int) -> tuple[int, int]:
    s, t = spec.relation_layers
    s, t = s % n_student if s < 0 else s, t % n_teacher if t < 0 else t
    if not (0 <= s < n_student and 0 <= t < n_teacher):
        raise UsageError(f"--relation_layers {spec.relation_layers}: the student has layers 0..{n_student - 1}, the "
                         f"teacher 0..{n_teacher - 1}")  # fmt: skip
    return s, t


def _check_heads(objective: LayerwiseObjective, student, teacher) -> None:
    spec = objective.spec
    if spec.alpha_relation:
        R, widths = spec.relation_heads, (hidden_size(student), hidden_size(teacher))
        if R < 1 or any(w % R for w in widths):
            raise UsageError(f"--relation_heads {R} must divide both hidden sizes (student {widths[0]}, teacher "
                             f"{widths[1]})")  # fmt: skip
    if spec.alpha_attention:
        hs, ht = student.config.num_attention_heads, teacher.config.num_attention_heads
        if hs != ht:
            raise UsageError(f"--alpha_attention compares attention maps head by head: the student has {hs} heads, "
                             f"the teacher {ht} (use --alpha_relation, which works for any shape)")  # fmt: skip
        if not objective._attention_pairs():
            raise UsageError("--alpha_attention: the layer map pairs no layers (only the embeddings)")

"""The one held-out evaluation, shared by `fastdistil.train` (before and after training) and `fastdistil.evaluate`.

Definitions (the README states them too):
- masking: 15% of each batch's real, non-special tokens (at least one) become [MASK], drawn from a generator
  seeded with the run's seed, so every model sees the same positions;
- mlm_loss / mlm_top1 / perplexity: cross-entropy and top-1 accuracy of the model's MLM head at the masked
  positions;
- kl_to_teacher: KL(teacher || model) at T = 1 over the vocabulary, mean over the masked positions;
- embedding_cosine: mean over sequences of the cosine between the model's and the teacher's mean-pooled last
  hidden states, on the unmasked text; token_cosine: the same per real token, mean over tokens (both only when
  the two models have the same width);
- pairwise_spearman: Spearman's rank correlation between the teacher's and the model's cosine similarities of
  every pair of held-out sequences (mean-pooled embeddings, unmasked text): how well the model keeps which texts
  are alike, defined for any two widths.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdistil import data as fd_data
from fastdistil.models import encoder, hidden_size
from fastdistil.padding import mean_pool, row_mask

MASK_PROP = 0.15


@dataclass
class HeldoutBatch:
    input_ids: torch.Tensor  # (B, L) the text as it is
    attention_mask: torch.Tensor
    masked_ids: torch.Tensor  # with MASK_PROP of the tokens replaced by [MASK]
    labels: torch.Tensor  # original ids at the masked positions, -100 elsewhere (all -100 without a [MASK] token)


def mask_tokens(batch: fd_data.Batch, special_ids, mask_id: int, generator: torch.Generator, prop: float = MASK_PROP):
    """(masked ids, labels): `prop` of each batch's real, non-special tokens (at least one) become [MASK];
    labels hold their original ids and -100 elsewhere. The same generator state gives the same positions."""
    ids = batch.input_ids
    candidates = batch.attention_mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special_ids)))
    flat = candidates.flatten().nonzero().squeeze(1)
    labels = torch.full_like(ids, -100)
    if flat.numel() == 0:
        return ids.clone(), labels
    n = max(1, round(prop * flat.numel()))
    pos = flat[torch.randperm(flat.numel(), generator=generator)[:n]]
    masked, lab = ids.flatten().clone(), labels.flatten()
    lab[pos] = masked[pos]
    masked[pos] = mask_id
    return masked.view_as(ids), lab.view_as(ids)


def heldout_batches(seqs, idx, tokenizer, batch_size: int, seed: int) -> list[HeldoutBatch]:
    """The held-out sequences seqs[idx] in batches, each with its fixed masking."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(idx), batch_size):
        batch = fd_data.collate(seqs, idx[start : start + batch_size], tokenizer.pad_token_id)
        if tokenizer.mask_token_id is None:  # no [MASK] token: no MLM metrics, the embeddings still compare
            masked, labels = batch.input_ids, torch.full_like(batch.input_ids, -100)
        else:
            masked, labels = mask_tokens(batch, tokenizer.all_special_ids, tokenizer.mask_token_id, g)
        out.append(HeldoutBatch(batch.input_ids, batch.attention_mask, masked, labels))
    return out


class _Sums:
    def __init__(self):
        self.ce = self.kl = self.emb_cos = self.tok_cos = 0.0
        self.correct = self.n_masked = self.n_seq = self.n_tok = 0
        self.pooled: list = []  # (model, teacher) mean-pooled embeddings of each batch


@torch.no_grad()
def compare(model, teacher, batches, device, *, model_mlm: bool, teacher_mlm: bool, autocast=None, cosines=True):
    """Held-out metrics of `model` against `teacher` (see the module docstring); `autocast` is a context
    manager factory for the forward passes (the trainer's precision); cosines=False: the MLM metrics only."""
    autocast = autocast or contextlib.nullcontext
    kl = model_mlm and teacher_mlm and model is not teacher
    same_width = cosines and hidden_size(model) == hidden_size(teacher)
    s = _Sums()
    for b in batches:
        ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
        masked, labels = b.masked_ids.to(device), b.labels.to(device)
        with autocast():
            if model_mlm:
                _add_mlm(s, model, teacher if kl else None, masked, mask, labels)
            if cosines:
                _add_embeddings(s, model, teacher, ids, mask, same_width)
    return _result(s, model_mlm, kl)


def _add_mlm(s: _Sums, model, teacher, masked, mask, labels) -> None:
    sel = labels != -100
    logits = model(input_ids=masked, attention_mask=mask).logits[sel].float()
    s.ce += F.cross_entropy(logits, labels[sel], reduction="sum").item()
    s.correct += int((logits.argmax(-1) == labels[sel]).sum())
    s.n_masked += int(sel.sum())
    if teacher is not None:
        t_logits = teacher(input_ids=masked, attention_mask=mask).logits[sel].float()
        s.kl += F.kl_div(logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="sum").item()


def _add_embeddings(s: _Sums, model, teacher, ids, mask, same_width: bool) -> None:
    rows = row_mask(mask)
    h = encoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    t = encoder(teacher)(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    h_pooled, t_pooled = mean_pool(h, rows), mean_pool(t, rows)
    s.pooled.append((h_pooled.cpu(), t_pooled.cpu()))
    if same_width:
        s.emb_cos += F.cosine_similarity(h_pooled, t_pooled, dim=-1).sum().item()
        s.tok_cos += F.cosine_similarity(h[rows], t[rows], dim=-1).sum().item()
        s.n_seq += ids.shape[0]
        s.n_tok += int(rows.sum())


def pairwise_spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation between the cosine similarities of every pair of rows of `a` and the same
    pairs of `b` (the widths of a and b may differ); None with fewer than three rows, or when one side's
    similarities are all equal."""
    if a.shape[0] < 3:
        return None
    i, j = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    sims = []
    for x in (a, b):
        x = F.normalize(x.double(), dim=-1)
        sims.append(_average_ranks((x @ x.T)[i, j]))
    ra, rb = (r - r.mean() for r in sims)
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else None


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x, ties sharing their mean rank (Spearman's definition)."""
    order = torch.argsort(x)
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    mean_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _result(s: _Sums, mlm: bool, kl: bool) -> dict:
    res: dict = {}
    if mlm and s.n_masked:
        res["mlm_loss"] = s.ce / s.n_masked
        res["perplexity"] = math.exp(min(res["mlm_loss"], 700.0))
        res["mlm_top1"] = s.correct / s.n_masked
        if kl:
            res["kl_to_teacher"] = s.kl / s.n_masked
    if s.n_seq:
        res["embedding_cosine"] = s.emb_cos / s.n_seq
        res["token_cosine"] = s.tok_cos / s.n_tok
    if s.pooled:
        res["pairwise_spearman"] = pairwise_spearman(torch.cat([h for h, _ in s.pooled]),
                                                     torch.cat([t for _, t in s.pooled]))  # fmt: skip
    return res

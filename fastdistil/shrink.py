"""Model transformations that make a BERT-family model smaller: attention-head removal, dynamic int8
quantization, magnitude pruning. fastdistil.compress applies them; fastdistil.artifacts uses them to rebuild the
compressed formats when loading."""

from __future__ import annotations

import torch
from torch import nn

from fastdistil.models import ModelError, attention_parts, encoder_layers

# ---------------------------------------------------------------------------------------------------------
# Attention heads of BERT-family layers


def head_importance(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, the L2 norm of each head's weights: its rows of Q, K, V and its columns of the output."""
    out = []
    for layer in encoder_layers(model):
        att, q, k, v, o = attention_parts(layer)
        d = att.attention_head_size
        rows = sum(lin.weight.detach().float().view(-1, d, lin.in_features).square().sum((1, 2)) for lin in (q, k, v))
        cols = o.weight.detach().float().view(o.out_features, -1, d).square().sum((0, 2))
        out.append((rows + cols).sqrt())
    return out


def choose_heads(importance: list[torch.Tensor], sparsity: float) -> list[list[int]]:
    """The heads to KEEP per layer after removing round(sparsity * all heads) of the least important, globally,
    never the last head of a layer."""
    total = sum(len(x) for x in importance)
    n_remove = round(sparsity * total)
    ranked = sorted((float(s), li, h) for li, x in enumerate(importance) for h, s in enumerate(x))
    kept = [set(range(len(x))) for x in importance]
    for _, li, h in ranked:
        if n_remove == 0:
            break
        if len(kept[li]) > 1:
            kept[li].discard(h)
            n_remove -= 1
    return [sorted(k) for k in kept]


def _rows(lin: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(index), bias=lin.bias is not None).to(lin.weight)
    with torch.no_grad():
        new.weight.copy_(lin.weight[index])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[index])
    return new


def _cols(lin: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(index), lin.out_features, bias=lin.bias is not None).to(lin.weight)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, index])
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def keep_heads(model: nn.Module, heads_kept: list[list[int]]) -> nn.Module:
    """Shrink every layer's attention to the listed heads, in place (the forward reshapes with the head size, so
    fewer heads need only smaller matrices and the right head count)."""
    layers = encoder_layers(model)
    if len(heads_kept) != len(layers):
        raise ModelError(f"heads for {len(heads_kept)} layers given, the model has {len(layers)}")
    for layer, heads in zip(layers, heads_kept):
        att, q, k, v, o = attention_parts(layer)
        d = att.attention_head_size
        index = torch.tensor([h * d + i for h in heads for i in range(d)], device=q.weight.device)
        names = ("q_lin", "k_lin", "v_lin") if hasattr(att, "q_lin") else ("query", "key", "value")
        for name, lin in zip(names, (q, k, v)):
            setattr(att, name, _rows(lin, index))
        if hasattr(att, "out_lin"):
            att.out_lin = _cols(o, index)
            att.n_heads = len(heads)
        else:
            layer.attention.output.dense = _cols(o, index)
            att.num_attention_heads = len(heads)
            att.all_head_size = len(heads) * d
    return model


# ---------------------------------------------------------------------------------------------------------
# The three methods


def quantize_int8(model: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated upstream (for torchao) but works
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def prune_magnitude(model: nn.Module, sparsity: float) -> nn.Module:
    from torch.nn.utils import prune

    linears = [(m, "weight") for layer in encoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=sparsity)
    for m, name in linears:
        prune.remove(m, name)  # make it permanent: plain weights with zeros, no masks or hooks
    return model

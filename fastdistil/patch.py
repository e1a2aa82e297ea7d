"""Run the attention of transformers encoders through fastdistil.ops.attention.

    model = fastdistil.patch_model(model)               # padded batches, key padding mask
    model = fastdistil.patch_model(model, unpad=True)   # variable-length: padding costs no attention work
    fastdistil.unpatch_model(model)                     # back to what it used before

transformers (>= 4.48) routes BERT, DistilBERT, RoBERTa, ... self-attention through a registry of attention
functions chosen by config._attn_implementation. patch_model registers two entries, "fastdistil" and
"fastdistil_varlen", each with the flash-attention mask builder (which hands the attention function the 2-D
padding mask, or None when nothing is padded), and switches the model to one of them. The modules, weights and
state_dict are untouched: a patched model saves and loads like any other.

Dropout follows the module's training flag, as in transformers (attention_probs_dropout_prob while training, 0 in
eval); its mask comes from a seed drawn from torch's CPU generator per call.

unpad=True writes zeros at padded query positions (their values are never used: every later key at that position
is masked, and the losses skip them), where transformers computes attention over the real keys there; the
positions that are not padding match.
"""

from __future__ import annotations

from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from fastdistil.ops.attention import attention, attention_varlen, pad_output, unpad_indices

IMPL = "fastdistil"
IMPL_VARLEN = "fastdistil_varlen"
_PREVIOUS = "_fastdistil_previous_attn_implementation"


def _padding_mask(attention_mask):
    """The 2-D (B, L) keep mask the flash-attention mask builder passes (or None), as bool."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            "fastdistil attention expects a 2-D padding mask from transformers, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def _padded_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function signature: (B, heads, L, D) in, (B, L, heads, D) out, no weights."""
    mask = _padding_mask(attention_mask)
    out = attention(query, key, value, mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None


class _UnpadCache:
    """Every layer of one forward pass gets the same mask tensor: unpad it once (one host read), not per layer."""

    def __init__(self):
        self.mask = None  # the last mask seen (a strong reference: identity + version say it is unchanged)
        self.version = -1
        self.value = None

    def __call__(self, mask):
        if mask is not self.mask or mask._version != self.version:
            self.mask, self.version = mask, mask._version
            self.value = unpad_indices(mask)
        return self.value


_unpad = _UnpadCache()


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    mask = _padding_mask(attention_mask)
    if mask is None:
        return _padded_attention(module, query, key, value, None, scaling, dropout)
    B, H, L, D = query.shape
    indices, cu, max_seqlen = _unpad(mask)
    q, k, v = (x.transpose(1, 2).reshape(B * L, H, D)[indices] for x in (query, key, value))
    out = attention_varlen(q, k, v, cu, max_seqlen, dropout_p=dropout, scale=scaling)
    return pad_output(out, indices, B, L), None


AttentionInterface.register(IMPL, _padded_attention)
AttentionInterface.register(IMPL_VARLEN, _varlen_attention)
AttentionMaskInterface.register(IMPL, flash_attention_mask)
AttentionMaskInterface.register(IMPL_VARLEN, flash_attention_mask)


def _check_encoder(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model.config, "is_decoder", False) or getattr(model.config, "add_cross_attention", False):
        raise ValueError("fastdistil attention is bidirectional: it cannot run a decoder or cross-attention")
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' attention interface, "
            "so it cannot be patched"
        )


def patch_model(model: PreTrainedModel, unpad: bool = False) -> PreTrainedModel:
    """Make every self-attention of `model` run fastdistil.ops.attention (Triton on CUDA, ATen's CPU flash kernel
    on CPU); unpad=True runs attention_varlen on the unpadded tokens. Returns the model (patched in place)."""
    _check_encoder(model)
    if not hasattr(model, _PREVIOUS):
        setattr(model, _PREVIOUS, model.config._attn_implementation)
    model.set_attn_implementation(IMPL_VARLEN if unpad else IMPL)
    return model


def unpatch_model(model: PreTrainedModel) -> PreTrainedModel:
    """Undo patch_model: the attention implementation the model had before."""
    previous = getattr(model, _PREVIOUS, None)
    if previous is not None:
        model.set_attn_implementation(previous)
        delattr(model, _PREVIOUS)
    return model


def is_patched(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in (IMPL, IMPL_VARLEN)

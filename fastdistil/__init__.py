"""fastdistil: distil BERT-family teachers into DistilBERT-style students, with fused kernels.

Import order matters: backend loads the native extension (its C++ kernels register into the private
ops), then ops defines the schemas, fakes, autograd and wiring of every op.
"""

from fastdistil import (
    backend,  # noqa: F401  (1. loads _C)
    ops,  # noqa: F401  (2. every op and its wiring)
)
from fastdistil.heads import MLMDistiller, mlm_parts
from fastdistil.nn import CosineLoss, DistillHead, KDLoss
from fastdistil.ops import attention, attention_varlen, cosine_loss, fused_distill_head, kd_loss, relation_kl
from fastdistil.patch import is_patched, patch_model, unpatch_model

__version__ = "0.1.0"
__all__ = [
    "DistilResult",
    "distil",
    "attention",
    "attention_varlen",
    "is_patched",
    "patch_model",
    "unpatch_model",
    "CosineLoss",
    "DistillHead",
    "KDLoss",
    "MLMDistiller",
    "cosine_loss",
    "fused_distill_head",
    "kd_loss",
    "mlm_parts",
    "relation_kl",
]


def __getattr__(name):
    """fastdistil.distil / fastdistil.DistilResult (the Python API) load the training stack on first use only."""
    if name in ("distil", "DistilResult"):
        from fastdistil import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastdistil' has no attribute {name!r}")

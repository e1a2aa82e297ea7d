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
from fastdistil.ops import cosine_loss, fused_distill_head, kd_loss

__version__ = "0.1.0"
__all__ = [
    "CosineLoss",
    "DistillHead",
    "KDLoss",
    "MLMDistiller",
    "cosine_loss",
    "fused_distill_head",
    "kd_loss",
    "mlm_parts",
]

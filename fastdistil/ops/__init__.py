"""Public ops. Each file in this folder states one op completely (reference, schema, fake, autograd,
public function, wiring).

The public functions share their names with their files (fastdistil.ops.kd_loss is the function; the
head's is fused_distill_head, in distill_head.py);
op_module("kd_loss") returns the file's module, with its references and *_IMPLS tables.
"""

import importlib
from types import ModuleType

from fastdistil.ops._common import KERNELS, reference_kernels, use_kernels
from fastdistil.ops.attention import attention, attention_varlen
from fastdistil.ops.cosine_loss import cosine_loss
from fastdistil.ops.distill_head import fused_distill_head
from fastdistil.ops.kd_loss import kd_loss
from fastdistil.ops.relation_kl import relation_kl

OPS = ("kd_loss", "cosine_loss", "distill_head", "attention", "relation_kl")

__all__ = [
    "KERNELS",
    "OPS",
    "reference_kernels",
    "use_kernels",
    "attention",
    "attention_varlen",
    "cosine_loss",
    "fused_distill_head",
    "kd_loss",
    "op_module",
    "relation_kl",
]


def op_module(name: str) -> ModuleType:
    """The module fastdistil/ops/<name>.py (the attribute of the same name is the public function)."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; fastdistil has {OPS}")
    return importlib.import_module(f"fastdistil.ops.{name}")

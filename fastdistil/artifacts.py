"""Model artefacts: what fastdistil loads and saves besides training checkpoints. A `Model` is a network with its
tokenizer and where it came from; `load_model` reads a transformers checkpoint or any compressed format that
fastdistil.compress writes (each output holds a MARKER file naming its format)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdistil import models as fd_models
from fastdistil.fileio import atomic_directory
from fastdistil.models import ModelError
from fastdistil.shrink import keep_heads, quantize_int8

MARKER = "fastdistil-compressed.json"


@dataclass
class Model:
    name: str
    path: str  # the directory holding its files (for the size on disk)
    model: torch.nn.Module  # with its MLM head when it has one
    tokenizer: object
    has_mlm_head: bool
    trainable: bool = True  # False for int8 models: no fine-tuning, use --probe
    format: str = "transformers"


def load_model(name_or_path: str) -> Model:
    """A transformers checkpoint (with its MLM head when it has one) or a fastdistil.compress output."""
    if os.path.isfile(os.path.join(name_or_path, MARKER)):
        return load_compressed(name_or_path)
    try:
        t = fd_models.load_teacher(name_or_path)
    except ModelError as e:
        raise ModelError(str(e).replace("--teacher ", "")) from e
    path = fd_models.builtin_teacher_path() if name_or_path == fd_models.BUILTIN_TEACHER else name_or_path
    return Model(name_or_path, path, t.model, t.tokenizer, t.has_mlm_head)


def _auto_class(has_mlm_head: bool) -> str:
    return "AutoModelForMaskedLM" if has_mlm_head else "AutoModel"


def save_compressed(src: Model, model: nn.Module, method: str, out: Path, info: dict) -> None:
    meta = {"format": {"int8": "int8-dynamic", "magnitude": "transformers", "heads": "pruned-heads"}[method]}
    meta |= {
        "method": method,
        "source": src.name,
        "auto_class": _auto_class(src.has_mlm_head),
        "torch": torch.__version__,
    }
    meta |= info
    with atomic_directory(out, marker=MARKER) as tmp:
        if method == "magnitude":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
            if method == "int8":
                torch.save(model.state_dict(), tmp / "quantized.pt")
            else:
                from safetensors.torch import save_model

                save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / decoder weights
        src.tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))


def load_compressed(path: str) -> Model:
    """A directory written by fastdistil.compress, as a Model (its .model is the network)."""
    import transformers

    meta = json.loads((Path(path) / MARKER).read_text())
    fmt = meta.get("format")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    has_head = meta["auto_class"] == "AutoModelForMaskedLM"
    auto = getattr(transformers, meta["auto_class"])
    if fmt == "transformers":
        with fd_models.quiet(transformers):
            model = auto.from_pretrained(path)
        return Model(path, path, model.eval(), tokenizer, has_head, format="transformers (sparse)")
    config = transformers.AutoConfig.from_pretrained(path)
    model = auto.from_config(config).eval()
    if fmt == "int8-dynamic":
        model = quantize_int8(model)
        import warnings

        with warnings.catch_warnings():  # loading quantized tensors goes through torch's deprecated TypedStorage
            warnings.simplefilter("ignore")
            model.load_state_dict(torch.load(Path(path) / "quantized.pt", weights_only=True))
        return Model(path, path, model, tokenizer, has_head, trainable=False, format="int8")
    if fmt == "pruned-heads":
        from safetensors.torch import load_model

        keep_heads(model, meta["heads_kept"])
        load_model(model, str(Path(path) / "model.safetensors"))
        return Model(path, path, model, tokenizer, has_head, format="pruned heads")
    raise ModelError(f"{path}: unknown fastdistil compressed format {fmt!r}")

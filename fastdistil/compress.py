"""python -m fastdistil.compress: shrink a (student) model further, and measure what it costs.

    python -m fastdistil.compress --model fastdistil-run/student --method int8 --out student-int8
    python -m fastdistil.compress --model fastdistil-run/student --method magnitude --sparsity 0.5 --out student-sparse
    python -m fastdistil.compress --model fastdistil-run/student --method heads --sparsity 0.25 --out student-heads

Methods and what they write (every output holds fastdistil-compressed.json naming its format, the model's
config.json and its tokenizer; fastdistil.evaluate and fastdistil.compress.load read all three):
- int8: post-training dynamic int8 quantization of every nn.Linear (torch.ao.quantization.quantize_dynamic: int8
  weights, activations quantized on the fly; CPU inference). NOT a plain transformers checkpoint: the weights are
  quantized.pt, the quantized model's state_dict. Load with `fastdistil.compress.load(path).model`.
- magnitude: global L1 (magnitude) pruning of the encoder layers' Linear weights to --sparsity (that fraction of
  them set to zero; embeddings and heads untouched). A plain transformers checkpoint: `from_pretrained` loads it.
  The zeros are stored densely, so the files are as large as before and dense kernels run no faster; the report
  says how many parameters are non-zero.
- heads: removes the --sparsity fraction of attention heads with the smallest weight norms (their rows of the
  query, key and value projections and their columns of the output projection; at least one head per layer),
  making the matrices smaller. NOT a plain transformers checkpoint (transformers' configs hold one head count for
  every layer): model.safetensors holds the smaller matrices, fastdistil-compressed.json the heads kept per
  layer. Load with `fastdistil.compress.load(path).model`.
Then the model before and after are evaluated by the same code as python -m fastdistil.evaluate (size, latency,
MLM metrics, embedding cosine, and with --labelled a linear probe: int8 models cannot be fine-tuned), with
retention relative to the model before compression; the report goes to <out>/compression-report/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from fastdistil import data as fd_data
from fastdistil import evaluate as fd_eval
from fastdistil import models as fd_models
from fastdistil.checkpoint import atomic_directory

MARKER = "fastdistil-compressed.json"
METHODS = ("int8", "magnitude", "heads")


# ---------------------------------------------------------------------------------------------------------
# Attention heads of BERT-family layers


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    base = fd_eval.encoder(model)
    for path in ("encoder.layer", "transformer.layer"):  # BERT / RoBERTa, DistilBERT
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    raise fd_eval.EvalError(f"{type(model).__name__}: no BERT or DistilBERT encoder layers to prune")


def attention_parts(layer: nn.Module):
    """(self-attention module, query, key, value, output projection) of one layer."""
    att = layer.attention
    if hasattr(att, "q_lin"):  # DistilBERT
        return att, att.q_lin, att.k_lin, att.v_lin, att.out_lin
    return att.self, att.self.query, att.self.key, att.self.value, att.output.dense


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
        raise fd_eval.EvalError(f"heads for {len(heads_kept)} layers given, the model has {len(layers)}")
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


def _auto_class(has_mlm_head: bool) -> str:
    return "AutoModelForMaskedLM" if has_mlm_head else "AutoModel"


def save(src: fd_eval.Model, model: nn.Module, method: str, out: Path, info: dict) -> None:
    meta = {"format": {"int8": "int8-dynamic", "magnitude": "transformers", "heads": "pruned-heads"}[method]}
    meta |= {
        "method": method,
        "source": src.name,
        "auto_class": _auto_class(src.has_mlm_head),
        "torch": torch.__version__,
    }
    meta |= info
    with atomic_directory(out) as tmp:
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


def load(path: str) -> fd_eval.Model:
    """A directory written by fastdistil.compress, as a fastdistil.evaluate.Model (its .model is the network)."""
    import transformers

    meta = json.loads((Path(path) / MARKER).read_text())
    fmt = meta.get("format")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    has_head = meta["auto_class"] == "AutoModelForMaskedLM"
    auto = getattr(transformers, meta["auto_class"])
    if fmt == "transformers":
        with fd_models._quiet(transformers):
            model = auto.from_pretrained(path)
        return fd_eval.Model(path, path, model.eval(), tokenizer, has_head, format="transformers (sparse)")
    config = transformers.AutoConfig.from_pretrained(path)
    model = auto.from_config(config).eval()
    if fmt == "int8-dynamic":
        model = quantize_int8(model)
        import warnings

        with warnings.catch_warnings():  # loading quantized tensors goes through torch's deprecated TypedStorage
            warnings.simplefilter("ignore")
            model.load_state_dict(torch.load(Path(path) / "quantized.pt", weights_only=True))
        return fd_eval.Model(path, path, model, tokenizer, has_head, trainable=False, format="int8")
    if fmt == "pruned-heads":
        from safetensors.torch import load_model

        keep_heads(model, meta["heads_kept"])
        load_model(model, str(Path(path) / "model.safetensors"))
        return fd_eval.Model(path, path, model, tokenizer, has_head, format="pruned heads")
    raise fd_eval.EvalError(f"{path}: unknown fastdistil compressed format {fmt!r}")


def compress(c) -> list[dict]:
    if not c.progress:
        fd_eval.quiet_libraries()
    src = fd_eval.load_model(c.model)
    if src.format != "transformers":
        raise fd_eval.EvalError(
            f"--model {c.model}: already compressed ({src.format}); start from a transformers checkpoint"
        )
    model = src.model.cpu()
    info: dict = {}
    if c.method == "int8":
        model = quantize_int8(model)
    elif c.method == "magnitude":
        model = prune_magnitude(model, c.sparsity)
        info["sparsity"] = c.sparsity
    else:
        heads = choose_heads(head_importance(model), c.sparsity)
        model = keep_heads(model, heads)
        info |= {"sparsity": c.sparsity, "heads_kept": heads}
    out = Path(c.out)
    save(src, model, c.method, out, info)
    print(f"wrote {out} ({c.method}); evaluating before / after", flush=True)
    c.teacher, c.students, c.probe = c.model, [str(out)], True
    if c.method == "int8":
        c.device = "cpu"  # dynamically quantized Linear layers run on the CPU only: compare both there
    c.out = str(out / "compression-report")
    return fd_eval.run(c, roles=("before", "after"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastdistil.compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a transformers checkpoint directory (e.g. a trained student)")
    p.add_argument("--method", required=True, choices=METHODS, help="int8, magnitude or heads (see above)")
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="magnitude: share of weights zeroed; heads: share of heads removed (default %(default)s)",
    )
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    fd_eval.add_common_arguments(p)
    return p


def main(argv=None) -> int:
    c = build_parser().parse_args(argv)
    try:
        fd_eval.check_common(c)
        if c.method != "int8" and not 0 < c.sparsity < 1:
            raise fd_eval.EvalError(f"--sparsity must be in (0, 1), got {c.sparsity}")
        if Path(c.out).resolve() == Path(c.model).resolve():
            raise fd_eval.EvalError("--out must differ from --model (the original is evaluated against)")
        compress(c)
    except (fd_eval.EvalError, fd_data.DataError, fd_models.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return fd_eval.EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

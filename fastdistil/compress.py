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
import sys
from pathlib import Path

from fastdistil import artifacts
from fastdistil import evaluate as fd_eval
from fastdistil.errors import EXIT_USAGE, UsageError
from fastdistil.fileio import check_destination
from fastdistil.shrink import choose_heads, head_importance, keep_heads, prune_magnitude, quantize_int8

MARKER = artifacts.MARKER
load = artifacts.load_compressed  # fastdistil.compress.load(path).model: the documented way to load an output
METHODS = ("int8", "magnitude", "heads")


def compress(c) -> list[dict]:
    if not c.progress:
        fd_eval.quiet_libraries()
    src = artifacts.load_model(c.model)
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
    artifacts.save_compressed(src, model, c.method, out, info)
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
        check_destination(c.out, "--out", marker=MARKER, inputs=(c.model,))
        compress(c)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

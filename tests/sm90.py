"""Compile Triton kernels for sm_90 (the H200) on a machine without a GPU, with Triton's own compiler and
ptxas, and read what a launch would need: shared memory, registers, spills. Used by tests/test_sm90_compile.py
(the compile gate) and runnable alone for the table:

    python -m tests.sm90            # the table
    python -m tests.sm90 --json     # one JSON line per variant (what the gate reads)
    python -m tests.sm90 --probe    # a tile known to spill, to show the gate can fail

It must run with TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

SM90_SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KB)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Usage:
    shared: int
    registers: int
    spill_bytes: int  # spill stores + spill loads


def toolchain_problem() -> str | None:
    """Why sm_90 compilation cannot run here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        return f"triton's compiler is not importable ({e})"
    return None if os.path.isfile(_ptxas()) else f"no ptxas at {_ptxas()}"


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def signature(fn, types: dict[str, str], constexprs: dict) -> dict:
    """Triton's signature for `fn`: constexprs as such, every other argument typed by `types` (by exact name,
    else by the rule: pointers are the names in types['*'], the rest i32)."""
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return sig


@functools.lru_cache(maxsize=None)
def _compile(fn, sig_items: tuple, const_items: tuple, num_warps: int) -> Usage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs = dict(sig_items), dict(const_items)
    # Pointers 16-byte aligned and strides multiples of 16, as the ops' real (contiguous, padded) tensors are:
    # Triton specialises on that, and vector widths change registers and shared memory.
    aligned = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items()) if t.startswith("*")}
    src = ASTSource(fn, sig, constexprs, attrs=aligned)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return Usage(kernel.metadata.shared, regs, spills)


def compile_sm90(fn, types: dict[str, str], constexprs: dict, num_warps: int = 4) -> Usage:
    sig = signature(fn, types, constexprs)
    return _compile(fn, tuple(sig.items()), tuple(sorted(constexprs.items())), num_warps)


# ---------------------------------------------------------------------------------------------------------
# The variants the ops launch


def attention_variants():
    """(name, dtype, kernel, types, constexprs, num_warps) of every attention kernel variant the op launches:
    each kernel, dtype and head-size class, padded (mask + dropout, the heaviest) and varlen (+ dropout)."""
    from fastdistil.kernels import attention as A

    kernels = {"fwd": A._attn_fwd_kernel, "bwd_dkdv": A._attn_bwd_dkdv_kernel, "bwd_dq": A._attn_bwd_dq_kernel}
    for dtype, dt in DTYPES.items():
        for D in (16, 32, 64, 128, 256):
            for kname, fn in kernels.items():
                if A.block_d(D) not in A.TILES[kname][A._dtype_class(dtype)]:
                    continue  # refused by the op (fastdistil/ops/attention.py), so never launched
                block_d, block_m, block_n, warps = A.launch_config(kname, D, dtype)
                types = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
                types |= {"LSE": "*fp32", "DELTA": "*fp32", "kpm_ptr": "*u8", "kv_end_ptr": "*i32", "cu_ptr": "*i32",
                          "qk_scale": "fp32", "sm_scale": "fp32", "drop_scale": "fp32"}  # fmt: skip
                for layout, kpm, varlen in (("padded", True, False), ("varlen", False, True)):
                    const = dict(HAS_KPM=kpm, IS_VARLEN=varlen, HAS_DROPOUT=True, BLOCK_D=block_d, BLOCK_M=block_m,
                                 BLOCK_N=block_n, DOT_PRECISION=A._precision(dtype))  # fmt: skip
                    yield f"attention {kname} {dt} D<={D} {layout}", dt, fn, types, const, warps


def loss_variants():
    from fastdistil.kernels import cosine_loss as C
    from fastdistil.kernels import distill_head as H
    from fastdistil.kernels import kd_loss as K

    f32 = {"loss_ptr": "*fp32", "kl_ptr": "*fp32", "ce_ptr": "*fp32", "kl_coef_ptr": "*fp32", "mlm_coef_ptr": "*fp32",
           "stats_ptr": "*fp32", "grad_loss_ptr": "*fp32", "mask_ptr": "*u8", "rows_ptr": "*u8",
           "labels_ptr": "*i64", "inv_temperature": "fp32", "stride_row": "i64"}  # fmt: skip
    for dtype, dt in DTYPES.items():
        data = {n: f"*{dt}" for n in ("s_ptr", "t_ptr", "grad_ptr", "gs_ptr", "gt_ptr")}
        types = {**f32, **data}
        yield f"kd_loss fwd {dt}", dt, K._kd_loss_fwd_kernel, types, dict(HAS_MASK=True, WITH_GRAD=True,
                                                                         BLOCK_V=K.fwd_block(30522)), 4  # fmt: skip
        yield f"kd_loss bwd {dt}", dt, K._kd_loss_bwd_kernel, types, dict(BLOCK_V=K.bwd_block(30522)), 4
        yield f"distill_epilogue {dt}", dt, H._distill_epilogue_kernel, types, dict(
            HAS_ROWS=True, HAS_LABELS=True, WITH_GRAD=True, BLOCK_V=H.block_v(30522)), 4
        for h in (768, 1024, 4096):
            yield f"cosine_loss fwd {dt} H={h}", dt, C._cosine_loss_fwd_kernel, types, dict(
                HAS_MASK=True, BLOCK_H=C._block_h(h)), 4
            yield f"cosine_loss bwd {dt} H={h}", dt, C._cosine_loss_bwd_kernel, types, dict(
                HAS_MASK=True, STUDENT_GRAD=True, TEACHER_GRAD=False, BLOCK_H=C._block_h(h)), 4


def relation_variants():
    """Every relation_kl kernel for each dtype and tile class (the larger of the two padded head sizes), both sides
    at that size (the heaviest), with a padding mask, plus a narrow student against a wide teacher."""
    from fastdistil.kernels import relation_kl as R

    kernels = {"fwd": R._relation_kl_fwd_kernel, "bwd_dl": R._relation_kl_bwd_dl_kernel,
               "bwd_dr": R._relation_kl_bwd_dr_kernel}  # fmt: skip
    for dtype, dt in DTYPES.items():
        types = {n: f"*{dt}" for n in ("SL", "SR", "TL", "TR", "DSL", "DSR")}
        types |= {n: "*fp32" for n in ("KL", "LSE_S", "LSE_T", "G")}
        types |= {"kpm_ptr": "*u8", "kv_end_ptr": "*i32", "ss2": "fp32", "ts2": "fp32", "student_scale": "fp32"}
        for ds, dt_ in [(d, d) for d in (16, 32, 64, 128, 256)] + [(32, 64)]:
            cfg = R.launch_config(ds, dt_, dtype)
            warps = cfg.pop("num_warps")
            for kname, fn in kernels.items():
                yield f"relation_kl {kname} {dt} Ds={ds} Dt={dt_}", dt, fn, types, {"HAS_KPM": True, **cfg}, warps


def all_variants():
    yield from attention_variants()
    yield from loss_variants()
    yield from relation_variants()


PROBE = "attention fwd fp32 D<=64 padded"


def main(argv: list[str]) -> None:
    import json

    problem = toolchain_problem()
    if problem:
        raise SystemExit(problem)
    if "--probe" in argv:  # fp32, 64 x 64 tiles, four warps at D = 64: spills (why TILES picks smaller ones)
        _, dt, fn, types, const, _ = next(v for v in attention_variants() if v[0] == PROBE)
        u = compile_sm90(fn, types, {**const, "BLOCK_M": 64, "BLOCK_N": 64}, 4)
        print(json.dumps({"name": PROBE + " 64x64x4", "dtype": dt, **u.__dict__}))
        return
    if "--json" not in argv:
        print(f"{'variant':48} {'shared (B)':>10} {'regs':>5} {'spill (B)':>9}")
    only = [a for a in argv if not a.startswith("--")]  # e.g. `relation_kl`: the variants whose name starts so
    for name, dt, fn, types, const, warps in all_variants():
        if only and not any(name.startswith(o) for o in only):
            continue
        u = compile_sm90(fn, types, const, warps)
        if "--json" in argv:
            print(json.dumps({"name": name, "dtype": dt, **u.__dict__}), flush=True)
        else:
            flag = "  OVER" if u.shared > SM90_SHARED_LIMIT else ""
            print(f"{name:48} {u.shared:>10} {u.registers:>5} {u.spill_bytes:>9}{flag}", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

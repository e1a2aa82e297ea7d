"""Shared benchmark machinery: the machine's own bandwidth ceiling, honest peak-memory deltas, and the
results table with the targets of each op.

Peak memory on CPU is measured in a FRESH process per arm (benchmarks/memprobe.py): after a warm-up step
(compilation, thread pools), freed memory is handed back (malloc_trim), the kernel's high-water mark is
reset (/proc/self/clear_refs), and VmHWM - VmRSS over one step is the delta. ru_maxrss is useless for
this: a child inherits its parent's peak. On CUDA: torch.cuda.max_memory_allocated over one step.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# tests/run_gpu.sh's mode: only the arms that answer the GPU goals (no torch.compile arms), one size per op, and
# every row appended to FASTDISTIL_BENCH_ROWS (JSON lines) as soon as it is measured, so a time-out loses nothing.
QUICK = os.environ.get("FASTDISTIL_BENCH_QUICK") == "1"
ROWS_LOG = os.environ.get("FASTDISTIL_BENCH_ROWS")


def generator(seed: int = 0) -> torch.Generator:
    """A seeded generator on the benchmark device: inputs are drawn where they are used (a GPU draws N = 16384
    rows of logits in microseconds; one CPU thread takes seconds)."""
    return torch.Generator(DEVICE).manual_seed(seed)


def randn(*shape, generator: torch.Generator, scale: float = 1.0, dtype=None) -> torch.Tensor:
    x = torch.randn(*shape, generator=generator, device=DEVICE)
    return (x * scale if scale != 1.0 else x).to(dtype or torch.float32)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth_gbs(mbytes: int = 512, allocations: int = 4, repeats: int = 5) -> float:
    """STREAM-copy bandwidth of this machine, in GB/s counting bytes read + bytes written: the best of
    `repeats` copies on warm buffers much larger than the caches, over `allocations` fresh buffer pairs
    (readings vary by a third with where the pages land; the best is the ceiling)."""
    n = mbytes * 2**20 // 4
    best = float("inf")
    for _ in range(allocations):
        src = torch.randn(n, device=DEVICE)
        dst = torch.empty_like(src)
        dst.copy_(src)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            dst.copy_(src)
            sync()
            best = min(best, time.perf_counter() - t0)
        del src, dst
    return 2 * n * 4 / best / 1e9


def measure_gemm_gflops(dtype: torch.dtype = torch.float32, m: int = 1024, k: int = 768, n: int = 30522) -> float:
    """Best GFLOP/s of an (m, k) x (k, n) matmul in `dtype` on this machine (BERT's vocabulary projection
    shape), over both layouts of the right operand ((k, n), and (n, k) transposed like a Linear weight: CPU
    bf16 kernels differ tenfold between them): the ceiling of GEMM-bound work. Cached per dtype."""
    key = f"gemm_gflops_{dtype}"
    if key not in STATE:
        a = torch.randn(m, k, device=DEVICE).to(dtype)
        b = torch.randn(k, n, device=DEVICE).to(dtype)
        b_t = torch.randn(n, k, device=DEVICE).to(dtype)
        best = float("inf")
        for product in (lambda: a @ b, lambda: a @ b_t.t()):
            product()
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                product()
                sync()
                best = min(best, time.perf_counter() - t0)
        STATE[key] = 2 * m * k * n / best / 1e9
    return STATE[key]


def arms(impls: dict) -> list[str]:
    """The arms of an op's benchmark: the eager baseline, torch.compile of it, ours (the wiring's choice),
    and on CUDA ours with each CUDA implementation forced ("ours:cuda_cpp", "ours:cuda_triton")."""
    forced = [f"ours:{name}" for name in impls if name.startswith("cuda")] if DEVICE == "cuda" else []
    return without_compiled(["eager", "compiled", "ours", *forced])


def without_compiled(arms: list[str]) -> list[str]:
    return [a for a in arms if not (QUICK and a == "compiled")]


def padding_mask(N: int, generator: torch.Generator) -> torch.Tensor:
    """(N,) bool with ~10% of rows False, like the attention mask of a padded batch."""
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    mask[torch.randperm(N, generator=generator, device=DEVICE)[: N // 10]] = False
    return mask


def loss_step(arm: str, reference, ours, run_loss, grad_of: torch.Tensor):
    """A zero-argument fwd+bwd step for `arm`: run_loss(loss_fn) must return the loss; the loss function is
    `reference` (eager), torch.compile(reference) (compiled) or `ours` (with "ours:IMPL" forcing that CUDA
    kernel). The gradient of `grad_of` is dropped after each step, as an optimizer's zero_grad would."""
    from fastdistil import backend

    if arm == "eager":
        loss_fn = reference
    elif arm == "compiled":
        loss_fn = torch.compile(reference)
    else:
        loss_fn = ours
    impl = arm.split(":", 1)[1] if arm.startswith("ours:") else None

    def step():
        with backend.force_cuda_impl(impl):
            run_loss(loss_fn).backward()
        grad_of.grad = None
        sync()

    return step


def peak_memory_delta(bench_module: str, case: dict) -> int:
    """Bytes one step of `case` adds at its peak, measured in a fresh process (CPU) or in-process (CUDA)."""
    if DEVICE == "cuda":
        import importlib

        step = importlib.import_module(bench_module).make_step(**case)
        step()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        return torch.cuda.max_memory_allocated() - base
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.memprobe", bench_module, json.dumps(case)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    if r.returncode != 0:
        raise RuntimeError(f"memory probe failed for {bench_module} {case}:\n{r.stderr[-3000:]}")
    return int(r.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    op: str
    arm: str
    case: dict
    median_ms: float
    peak_delta_bytes: int
    bytes_moved: int  # the bytes that must move: inputs read once, outputs written once
    extra: dict = field(default_factory=dict)

    @property
    def gbs(self) -> float:
        return self.bytes_moved / (self.median_ms / 1e3) / 1e9


ROWS: list[Row] = []
STATE: dict = {}
# {(op, case_key): [(description, check(rows_by_arm, ceiling) -> (ok, measured_text))]}, filled by bench files.
TARGETS: dict = {}


def time_ratio_target(other: str, at_most: float):
    """A report target: ours' median time / the `other` arm's <= at_most (0.1 = "10x faster", 1.2 = "at most 20%
    slower"). Returns check(rows_by_arm, ceiling) -> (ok, measured text)."""

    def check(by_arm, ceiling):
        ours, base = by_arm.get("ours"), by_arm.get(other)
        if not (ours and base):
            return False, "not measured"
        ratio = ours.median_ms / base.median_ms
        text = f"{ratio:.3f}x the time, {1 / ratio:.1f}x faster ({ours.median_ms:.0f} ms vs {base.median_ms:.0f} ms)"
        return ratio <= at_most, text

    return check


def case_key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)


def time_step(step, rounds: int) -> float:
    """Median seconds of `rounds` calls (after one warm-up), for runs without pytest-benchmark."""
    step()
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(module, case: dict, benchmark=None) -> Row:
    """Time one case of a bench module (pytest-benchmark's fixture when given), measure its peak memory
    delta, and record the row. A bench module defines OP, CASES, make_step(**case), bytes_moved(case)
    and rounds(case); compute-bound ops also flops(case) and gemm_dtype(case), and are then reported in
    GFLOP/s against the machine's GEMM ceiling instead of GB/s."""
    step = module.make_step(**case)
    if benchmark is not None:
        step()  # warm-up (compilation, first-touch)
        benchmark.pedantic(step, rounds=module.rounds(case), iterations=1, warmup_rounds=0)
        median_s = benchmark.stats.stats.median
    else:
        median_s = time_step(step, module.rounds(case))
    del step
    row = Row(
        module.OP,
        case["arm"],
        {k: v for k, v in case.items() if k != "arm"},
        median_s * 1e3,
        peak_memory_delta(module.__name__, case),
        module.bytes_moved(case),
    )
    if hasattr(module, "tokens"):  # whole training steps: tokens/s
        row.extra["tokens_per_s"] = module.tokens(case) / median_s
    if hasattr(module, "flops"):
        row.extra["gflops"] = module.flops(case) / median_s / 1e9
        row.extra["gemm_ceiling_gflops"] = measure_gemm_gflops(module.gemm_dtype(case))
    if benchmark is not None:
        benchmark.extra_info.update(median_ms=row.median_ms, peak_delta_mb=row.peak_delta_bytes / 2**20, gbs=row.gbs)
    ROWS.append(row)
    if ROWS_LOG:
        with open(ROWS_LOG, "a") as f:
            f.write(json.dumps(asdict(row) | {"gbs": row.gbs}) + "\n")
    return row


def case_id(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


def machine() -> dict:
    info = {"device": DEVICE, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["threads"] = torch.get_num_threads()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def report(targets: dict, out_name: str | None = None) -> str:
    """The results table, grouped per (op, case), with ratios measured in this run, and target verdicts.

    targets: {(op, case_key): [(description, check(rows_by_arm, ceiling) -> (ok, measured_text))]}."""
    ceiling = STATE.get("bandwidth_gbs")
    lines = [f"machine: {machine()}", f"measured copy bandwidth (read + write): {ceiling:.1f} GB/s" if ceiling else ""]
    groups: dict = {}
    for row in ROWS:
        groups.setdefault((row.op, case_key(row.case)), []).append(row)
    verdicts = []
    for (op, key), rows in groups.items():
        by_arm = {r.arm: r for r in rows}
        eager, compiled = by_arm.get("eager"), by_arm.get("compiled")
        lines.append(f"\n{op}  {key}")
        rate_columns = ("GB/s", "% ceiling")  # memory-bound ops: against the copy bandwidth
        if "gflops" in rows[0].extra:  # compute-bound: GFLOP/s against the GEMM ceiling
            rate_columns = ("GFLOP/s", "% GEMM")
        elif "tokens_per_s" in rows[0].extra:  # whole training steps
            rate_columns = ("tok/s", "")
        header = ("arm", "median ms", "vs eager", "vs compiled", "peak MB", *rate_columns)
        lines.append("  {:22s} {:>10s} {:>9s} {:>12s} {:>9s} {:>7s} {:>9s}".format(*header))
        for r in rows:
            vs_e = f"{eager.median_ms / r.median_ms:8.2f}x" if eager else "-"
            vs_c = f"{compiled.median_ms / r.median_ms:11.2f}x" if compiled else "-"
            if "gflops" in r.extra:
                rate, top = r.extra["gflops"], r.extra["gemm_ceiling_gflops"]
            elif "tokens_per_s" in r.extra:
                rate, top = r.extra["tokens_per_s"], None
            else:
                rate, top = r.gbs, ceiling
            pct = f"{100 * rate / top:8.1f}%" if top else "-"
            mb = r.peak_delta_bytes / 2**20
            lines.append(f"  {r.arm:22s} {r.median_ms:10.2f} {vs_e:>9s} {vs_c:>12s} {mb:9.1f} {rate:7.2f} {pct:>9s}")
        for description, check in targets.get((op, key), []):
            ok, measured = check(by_arm, ceiling)
            verdicts.append(f"  [{'MET' if ok else 'MISSED'}] {op} {key}: {description}: {measured}")
    if verdicts:
        lines.append("\ntargets:")
        lines.extend(verdicts)
    text = "\n".join(lines)
    if out_name:
        os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
        path = os.path.join(ROOT, "benchmarks", "results", out_name)
        with open(path, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "bandwidth_gbs": ceiling,
                    "rows": [asdict(r) | {"gbs": r.gbs} for r in ROWS],
                    "targets": verdicts,
                    "table": text,
                },
                f,
                indent=1,
            )
    return text

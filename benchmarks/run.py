"""python -m benchmarks.run [OP ...]: the benchmark suites without pytest-benchmark (e.g. on a GPU machine
whose stack lacks it): the same cases, timing by median of repeated calls, the same report.

    python -m benchmarks.run                 # every bench_*.py
    python -m benchmarks.run kd_loss         # one op
"""

import argparse
import importlib
import os

from benchmarks import harness

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ops = sorted(f[len("bench_") : -3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ops", nargs="*", metavar="OP", help=f"one of {ops} (default: all)")
    parser.add_argument("--out", default=f"{harness.DEVICE}-latest.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    unknown = sorted(set(args.ops) - set(ops))
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {ops}")
    harness.STATE["bandwidth_gbs"] = harness.measure_bandwidth_gbs()
    for op in args.ops or ops:
        module = importlib.import_module(f"benchmarks.bench_{op}")
        for case in module.CASES:
            row = harness.run(module, case)
            print(f"{op:12s} {harness.case_id(case):28s} {row.median_ms:10.2f} ms", flush=True)
    # The ceiling is the best reading: measured again at the end, the maximum is kept (see conftest.py).
    harness.STATE["bandwidth_gbs"] = max(harness.STATE["bandwidth_gbs"], harness.measure_bandwidth_gbs())
    print(harness.report(harness.TARGETS, out_name=args.out))


if __name__ == "__main__":
    main()

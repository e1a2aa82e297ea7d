"""python -m benchmarks.memprobe MODULE CASE_JSON: peak resident-memory delta of one step, in bytes.

Runs in a fresh process so that nothing else this process did counts (see harness.py)."""

import ctypes
import importlib
import json
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    module, case = sys.argv[1], json.loads(sys.argv[2])
    step = importlib.import_module(module).make_step(**case)
    step()  # warm-up: compilation, thread pools, lazy initialisation
    from fastdistil import backend

    if backend.NATIVE is not None:
        backend.NATIVE.empty_cache()  # our cached gradient buffers count as the step's memory: release them
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the baseline is what is live
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    step()
    print((_status_kb("VmHWM") - base) * 1024)


if __name__ == "__main__":
    main()

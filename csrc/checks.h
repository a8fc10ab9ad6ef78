// Input checks shared by the CPU and CUDA kernels: one message per problem,
// naming the op and the tensor.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace ibmd {

// Shapes, dtypes and integers are formatted here (std::to_string) rather than
// streamed into TORCH_CHECK: with torch 2.11 built by one GCC and the extension's
// CUDA objects by nvcc with GCC 13, streaming an ArrayRef crashed (segfault)
// instead of raising, and so did streaming a bare int64_t (an H200, 2026-12-04:
// the first CUDA check whose message held one, check_coef's batch size).
// Messages therefore hold only strings.
inline std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

inline const char* dtype_str(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kFloat8_e4m3fn,
              op, ": ", name, " must be float64, float32, float16 or bfloat16, got ", dtype_str(t));
}

inline void check_like(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* op,
                       const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", shape_str(ref),
              ", got ", shape_str(t));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", device_str(t), " but ", ref_name, " is on ",
              device_str(ref));
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", dtype_str(t), " but ", ref_name,
              " has ", dtype_str(ref));
}

inline at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-sample coefficient: 1-D of length B, arithmetic dtype, same device.
inline void check_coef(const at::Tensor& coef, const at::Tensor& ref, const char* op, const char* name) {
  const int64_t batch = ref.size(0);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == batch, op, ": ", name, " must have shape [", std::to_string(batch),
              "] (one value per sample), got ", shape_str(coef));
  TORCH_CHECK(coef.device() == ref.device(), op, ": ", name, " is on ", device_str(coef), " but the inputs are on ",
              device_str(ref));
  TORCH_CHECK(coef.scalar_type() == opmath_type(ref.scalar_type()), op, ": ", name, " must be ",
              c10::toString(opmath_type(ref.scalar_type())), " for ", dtype_str(ref), " inputs, got ", dtype_str(coef));
}

inline void check_batched(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
  check_float(t, op, name);
}

// How the kernels walk a set of same-shaped tensors.
enum class Layout { kContiguous, kChannelsLast, kOther };

// Per-sample kernels need every sample to be one dense block of memory with
// the same element order in all inputs: contiguous or channels_last.
inline at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::kChannelsLast ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace ibmd

namespace ibmd {

// The inputs of an elementwise or per-sample kernel, in one common layout.
struct Prepared {
  std::vector<at::Tensor> inputs;  // same shape, dtype, device; contiguous or channels_last
  Layout layout;
  int64_t batch;
  int64_t per_sample;  // elements per sample, D
  at::MemoryFormat requested;  // the first input's layout, which outputs keep
};

// Checks that the tensors match the first one, picks a common memory layout
// (copying to contiguous when they disagree or are strided otherwise).
inline Prepared prepare(std::initializer_list<std::pair<const at::Tensor*, const char*>> named, const char* op,
                        bool need_quads = false) {
  auto first = *named.begin();
  check_batched(*first.first, op, first.second);
  for (auto& [t, name] : named) check_like(*first.first, first.second, *t, op, name);
  std::vector<const at::Tensor*> ptrs;
  for (auto& nt : named) ptrs.push_back(nt.first);
  Layout layout = Layout::kContiguous;
  {
    bool contiguous = true, channels_last = true;
    for (const at::Tensor* t : ptrs) {
      contiguous = contiguous && t->is_contiguous();
      channels_last = channels_last && t->dim() == 4 && t->is_contiguous(at::MemoryFormat::ChannelsLast);
    }
    // channels_last noise generation walks quads of 4 along W
    if (channels_last && need_quads && first.first->size(3) % 4 != 0) channels_last = false;
    layout = contiguous ? Layout::kContiguous : (channels_last ? Layout::kChannelsLast : Layout::kOther);
  }
  Prepared p;
  for (const at::Tensor* t : ptrs) p.inputs.push_back(layout == Layout::kOther ? t->contiguous() : *t);
  p.layout = layout == Layout::kOther ? Layout::kContiguous : layout;
  p.batch = first.first->size(0);
  p.per_sample = p.batch == 0 ? 0 : first.first->numel() / p.batch;
  p.requested = first.first->suggest_memory_format();
  return p;
}

// A loss kernel's inputs, then its mask when there is one (checked like the inputs: same shape,
// dtype, device and layout). One place for the CPU and CUDA losses.
inline Prepared prepare_loss(std::initializer_list<std::pair<const at::Tensor*, const char*>> named,
                             const std::optional<at::Tensor>& mask, const char* op) {
  if (!mask.has_value()) return prepare(named, op);
  std::vector<std::pair<const at::Tensor*, const char*>> all(named);
  all.push_back({&*mask, "mask"});
  if (all.size() == 3) return prepare({all[0], all[1], all[2]}, op);
  return prepare({all[0], all[1], all[2], all[3]}, op);
}

inline at::Tensor empty_in_layout(const Prepared& p) {
  return at::empty(p.inputs[0].sizes(), p.inputs[0].options().memory_format(memory_format_of(p.layout)));
}

// Outputs computed in a fallback layout go back to the first input's layout.
inline at::Tensor in_requested_layout(const Prepared& p, const at::Tensor& out) {
  return out.is_contiguous(p.requested) ? out : out.contiguous(p.requested);
}

// The upstream gradient of a per-sample loss: [B], on the inputs' device.
inline void check_loss_grad(const at::Tensor& grad, const Prepared& p, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == p.batch, op, ": grad must have shape [", std::to_string(p.batch), "], got ",
              shape_str(grad));
  TORCH_CHECK(grad.device() == weight.device(), op, ": grad is on ", device_str(grad), " but the inputs are on ",
              device_str(weight));
}

inline void check_seed(int64_t seed, const char* op) {
  TORCH_CHECK(seed >= -1, op, ": seed must be in [0, 2^63) (or -1 for no noise), got ", std::to_string(seed));
}

// The checks of ibmd::bridge_step, shared by its CPU and CUDA kernels: Philox
// noise in channels_last needs W % 4 == 0 (quads along W), else a copy.
inline Prepared prepare_bridge_step(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef_a,
                                    const at::Tensor& coef_b, const at::Tensor& std,
                                    const std::optional<at::Tensor>& noise, int64_t seed) {
  constexpr const char* op = "ibmd::bridge_step";
  check_seed(seed, op);
  const bool philox = !noise.has_value() && seed >= 0;
  Prepared p = noise.has_value() ? prepare({{&a, "a"}, {&b, "b"}, {&*noise, "noise"}}, op)
                                 : prepare({{&a, "a"}, {&b, "b"}}, op, /*need_quads=*/philox);
  check_coef(coef_a, a, op, "coef_a");
  check_coef(coef_b, a, op, "coef_b");
  check_coef(std, a, op, "std");
  return p;
}

// The checks of ibmd::bridge_step_backward, shared by its CPU and CUDA kernels.
inline Prepared prepare_bridge_step_backward(const at::Tensor& grad, const at::Tensor& coef_a,
                                             const at::Tensor& coef_b) {
  constexpr const char* op = "ibmd::bridge_step_backward";
  Prepared p = prepare({{&grad, "grad"}}, op);
  check_coef(coef_a, grad, op, "coef_a");
  check_coef(coef_b, grad, op, "coef_b");
  return p;
}

}  // namespace ibmd

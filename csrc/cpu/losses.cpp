// CPU kernels of the fused noise-conditioned losses (MATH.md 6) and their backward.
//
// An optional mask (same shape as the inputs: the wrapper in ibmd_fast/ops.py
// broadcasts it) weights every element: L_b = w_b * sum_i m_bi * term_bi / D,
// D all elements of the sample (I2SB and DDBM's normalisation for inpainting).
//
// Forward: per-sample sums over fixed chunks of kChunk elements (float32
// accumulators, float64 for float64 inputs), then the chunk sums of a sample
// added in order: the result does not depend on the number of threads.
// Backward: one pass, reading the inputs once and writing each gradient once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace ibmd {
namespace {

constexpr int64_t kChunk = 8192;
constexpr int64_t kGrain = 32768;
constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorize the sum

// sum over [begin, end) of term(i), with kLanes interleaved accumulators.
template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t begin, int64_t end, const Term& term) {
  acc_t acc[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  for (int l = 0; i < end; ++i, ++l) acc[l] += term(i);
  acc_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// loss[s] = w[s] / D * sum_{i in sample s} term(i)
template <typename acc_t, typename Term>
at::Tensor per_sample_loss(const Prepared& p, const at::Tensor& weight, const Term& term) {
  const int64_t B = p.batch, D = p.per_sample;
  const int64_t chunks = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  std::vector<acc_t> partial(B * chunks, acc_t(0));
  at::parallel_for(0, B * chunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s = c / chunks, k = c % chunks;
      const int64_t begin = s * D + k * kChunk, end = std::min(s * D + (k + 1) * kChunk, (s + 1) * D);
      partial[c] = lane_sum<acc_t>(begin, end, term);
    }
  });
  at::Tensor loss = at::empty({B}, weight.options());
  const at::Tensor w = weight.contiguous();
  const acc_t* pw = w.const_data_ptr<acc_t>();
  acc_t* pl = loss.mutable_data_ptr<acc_t>();
  for (int64_t s = 0; s < B; ++s) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += static_cast<double>(partial[s * chunks + k]);
    pl[s] = static_cast<acc_t>(static_cast<double>(pw[s]) * total / static_cast<double>(D));
  }
  return loss;
}

// scale[s] = 2 w[s] g[s] / D, the common factor of every gradient.
template <typename acc_t>
std::vector<acc_t> grad_scale(const at::Tensor& grad, const at::Tensor& weight, int64_t D) {
  const at::Tensor g = grad.contiguous().to(weight.scalar_type()), w = weight.contiguous();
  std::vector<acc_t> scale(w.numel());
  for (int64_t s = 0; s < w.numel(); ++s)
    scale[s] = static_cast<acc_t>(2.0 * static_cast<double>(w.const_data_ptr<acc_t>()[s]) *
                                  static_cast<double>(g.const_data_ptr<acc_t>()[s]) / static_cast<double>(D));
  return scale;
}

// f(std::true_type) when masked, else f(std::false_type): the mask multiply is
// compiled in only where there is a mask.
template <typename F>
inline void with_mask(bool masked, const F& f) {
  if (masked)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// body(s, begin, end) over sample segments of [0, numel) in parallel.
template <typename Body>
void for_each_segment(int64_t numel, int64_t D, const Body& body) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t s = i / D, seg_end = std::min(end, (s + 1) * D);
      body(s, i, seg_end);
      i = seg_end;
    }
  });
}

at::Tensor bridge_loss_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                           const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::bridge_loss";
  Prepared p = prepare_loss({{&pred, "pred"}, {&target, "target"}}, mask, op);
  check_coef(weight, pred, op, "weight");
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "bridge_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* y = p.inputs[1].const_data_ptr<scalar_t>();
    const scalar_t* m = mask.has_value() ? p.inputs[2].const_data_ptr<scalar_t>() : nullptr;
    with_mask(mask.has_value(), [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
      loss = per_sample_loss<acc_t>(p, weight, [=](int64_t i) {
        const acc_t d = static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i]);
        if constexpr (kMasked) return static_cast<acc_t>(m[i]) * (d * d);
        else return d * d;
      });
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> bridge_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                                            const at::Tensor& target, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::bridge_loss_backward";
  Prepared p = prepare_loss({{&pred, "pred"}, {&target, "target"}}, mask, op);
  check_coef(weight, pred, op, "weight");
  check_loss_grad(grad, p, weight, op);
  at::Tensor grad_pred = empty_in_layout(p), grad_target = empty_in_layout(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "bridge_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scale = grad_scale<acc_t>(grad, weight, p.per_sample);
    const scalar_t* x = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* y = p.inputs[1].const_data_ptr<scalar_t>();
    const scalar_t* m = mask.has_value() ? p.inputs[2].const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_pred.mutable_data_ptr<scalar_t>();
    scalar_t* gy = grad_target.mutable_data_ptr<scalar_t>();
    with_mask(mask.has_value(), [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
      for_each_segment(pred.numel(), p.per_sample, [&](int64_t s, int64_t begin, int64_t end) {
        const acc_t k = scale[s];
        for (int64_t i = begin; i < end; ++i) {
          acc_t g = k * (static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i]));
          if constexpr (kMasked) g *= static_cast<acc_t>(m[i]);
          gx[i] = static_cast<scalar_t>(g);
          gy[i] = static_cast<scalar_t>(-g);
        }
      });
    });
  });
  return {in_requested_layout(p, grad_pred), in_requested_layout(p, grad_target)};
}

at::Tensor ibmd_loss_cpu(const at::Tensor& teacher_pred, const at::Tensor& fake_pred, const at::Tensor& x0,
                         const at::Tensor& weight, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::ibmd_loss";
  Prepared p = prepare_loss({{&x0, "x0"}, {&teacher_pred, "teacher_pred"}, {&fake_pred, "fake_pred"}}, mask, op);
  check_coef(weight, x0, op, "weight");
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "ibmd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* t = p.inputs[1].const_data_ptr<scalar_t>();
    const scalar_t* f = p.inputs[2].const_data_ptr<scalar_t>();
    const scalar_t* m = mask.has_value() ? p.inputs[3].const_data_ptr<scalar_t>() : nullptr;
    with_mask(mask.has_value(), [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
      loss = per_sample_loss<acc_t>(p, weight, [=](int64_t i) {
        const acc_t xi = static_cast<acc_t>(x[i]);
        const acc_t dt = static_cast<acc_t>(t[i]) - xi, df = static_cast<acc_t>(f[i]) - xi;
        if constexpr (kMasked) return static_cast<acc_t>(m[i]) * (dt * dt - df * df);
        else return dt * dt - df * df;
      });
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ibmd_loss_backward_cpu(const at::Tensor& grad,
                                                                      const at::Tensor& teacher_pred,
                                                                      const at::Tensor& fake_pred,
                                                                      const at::Tensor& x0, const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::ibmd_loss_backward";
  Prepared p = prepare_loss({{&x0, "x0"}, {&teacher_pred, "teacher_pred"}, {&fake_pred, "fake_pred"}}, mask, op);
  check_coef(weight, x0, op, "weight");
  check_loss_grad(grad, p, weight, op);
  at::Tensor grad_t = empty_in_layout(p), grad_f = empty_in_layout(p), grad_x = empty_in_layout(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "ibmd_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scale = grad_scale<acc_t>(grad, weight, p.per_sample);
    const scalar_t* x = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* t = p.inputs[1].const_data_ptr<scalar_t>();
    const scalar_t* f = p.inputs[2].const_data_ptr<scalar_t>();
    scalar_t* gt = grad_t.mutable_data_ptr<scalar_t>();
    scalar_t* gf = grad_f.mutable_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    const scalar_t* m = mask.has_value() ? p.inputs[3].const_data_ptr<scalar_t>() : nullptr;
    with_mask(mask.has_value(), [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
      for_each_segment(x0.numel(), p.per_sample, [&](int64_t s, int64_t begin, int64_t end) {
        const acc_t k0 = scale[s];
        for (int64_t i = begin; i < end; ++i) {
          acc_t k = k0;
          if constexpr (kMasked) k *= static_cast<acc_t>(m[i]);
          const acc_t xi = static_cast<acc_t>(x[i]), ti = static_cast<acc_t>(t[i]), fi = static_cast<acc_t>(f[i]);
          gt[i] = static_cast<scalar_t>(k * (ti - xi));
          gf[i] = static_cast<scalar_t>(k * (xi - fi));
          gx[i] = static_cast<scalar_t>(k * (fi - ti));
        }
      });
    });
  });
  return {in_requested_layout(p, grad_t), in_requested_layout(p, grad_f), in_requested_layout(p, grad_x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ibmd, CPU, m) {
  m.impl("bridge_loss", &bridge_loss_cpu);
  m.impl("bridge_loss_backward", &bridge_loss_backward_cpu);
  m.impl("ibmd_loss", &ibmd_loss_cpu);
  m.impl("ibmd_loss_backward", &ibmd_loss_backward_cpu);
}

}  // namespace ibmd

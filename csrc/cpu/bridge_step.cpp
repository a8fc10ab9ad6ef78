// CPU kernels of ibmd::bridge_step, its backward, and ibmd::philox.
//
// One pass: read a, b (and noise if given), write out. In-kernel noise is made
// a block at a time into a small stack buffer (Philox4x32-10 + Box-Muller,
// csrc/philox.h), so no noise tensor is written or read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../philox.h"

namespace ibmd {
namespace {

constexpr int64_t kNoiseBlock = 1024;  // elements per noise block, a multiple of 4
constexpr int64_t kGrain = 32768;      // elements per parallel task

// Normals for logical elements [start, start + n), start a multiple of 4.
// Structure-of-arrays loops over Philox groups, so that the compiler
// vectorizes them (SSE2 baseline, AVX2 when the CPU has it; no FMA
// contraction, so both give the same bits).
template <int kMaxGroups>
__attribute__((always_inline)) inline void fill_normals_impl(int64_t start, int64_t n, uint32_t k0, uint32_t k1, float* buf) {
  // Always a whole block: a constant trip count vectorizes best (the tail of
  // the last block is computed and ignored).
  (void)n;
  constexpr int groups = kMaxGroups;
  const uint64_t g0 = static_cast<uint64_t>(start) / 4;
  alignas(64) uint32_t w[4][kMaxGroups];
  for (int g = 0; g < groups; ++g) {
    const uint64_t c = g0 + static_cast<uint64_t>(g);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k0, k1);
    w[0][g] = r.x[0];
    w[1][g] = r.x[1];
    w[2][g] = r.x[2];
    w[3][g] = r.x[3];
  }
  alignas(64) float out[4][kMaxGroups];
  for (int g = 0; g < groups; ++g) {
    const float r01 = sqrt_f(minus_two_log(uniform_open01(w[0][g])));
    const float r23 = sqrt_f(minus_two_log(uniform_open01(w[2][g])));
    float s01, c01, s23, c23;
    sincos_2pi(uniform_open01(w[1][g]), &s01, &c01);
    sincos_2pi(uniform_open01(w[3][g]), &s23, &c23);
    out[0][g] = r01 * c01;
    out[1][g] = r01 * s01;
    out[2][g] = r23 * c23;
    out[3][g] = r23 * s23;
  }
  for (int g = 0; g < groups; ++g)
    for (int j = 0; j < 4; ++j) buf[4 * g + j] = out[j][g];
}

__attribute__((target("avx2"))) void fill_normals_avx2(int64_t start, int64_t n, uint32_t k0, uint32_t k1,
                                                       float* buf) {
  fill_normals_impl<kNoiseBlock / 4>(start, n, k0, k1, buf);
}

void fill_normals_default(int64_t start, int64_t n, uint32_t k0, uint32_t k1, float* buf) {
  fill_normals_impl<kNoiseBlock / 4>(start, n, k0, k1, buf);
}

inline void fill_normals(int64_t start, int64_t n, uint32_t k0, uint32_t k1, float* buf) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2)
    fill_normals_avx2(start, n, k0, k1, buf);
  else
    fill_normals_default(start, n, k0, k1, buf);
}

// out[i] = ca[s] a[i] + cb[s] b[i] + sd[s] eps[i] over memory order, s = i / D.
// eps is noise[i], in-kernel Philox (contiguous layout: memory order is logical order), or 0.
template <typename scalar_t>
void step_linear(const scalar_t* a, const scalar_t* b, const scalar_t* noise, scalar_t* out,
                 const at::opmath_type<scalar_t>* ca, const at::opmath_type<scalar_t>* cb,
                 const at::opmath_type<scalar_t>* sd, int64_t numel, int64_t per_sample, int64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const bool philox = noise == nullptr && seed >= 0;
  at::parallel_for(0, (numel + kNoiseBlock - 1) / kNoiseBlock, kGrain / kNoiseBlock, [&](int64_t blk0, int64_t blk1) {
    alignas(64) float eps[kNoiseBlock];
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t start = blk * kNoiseBlock, end = std::min(numel, start + kNoiseBlock);
      if (philox) fill_normals(start, end - start, k0, k1, eps);
      for (int64_t i = start; i < end;) {  // one sample segment at a time
        const int64_t s = i / per_sample, seg_end = std::min(end, (s + 1) * per_sample);
        const opmath_t cas = ca[s], cbs = cb[s], sds = sd[s];
        if (philox) {
          for (int64_t j = i; j < seg_end; ++j)
            out[j] = static_cast<scalar_t>(cas * static_cast<opmath_t>(a[j]) + cbs * static_cast<opmath_t>(b[j]) +
                                           sds * static_cast<opmath_t>(eps[j - start]));
        } else if (noise != nullptr) {
          for (int64_t j = i; j < seg_end; ++j)
            out[j] = static_cast<scalar_t>(cas * static_cast<opmath_t>(a[j]) + cbs * static_cast<opmath_t>(b[j]) +
                                           sds * static_cast<opmath_t>(noise[j]));
        } else {
          for (int64_t j = i; j < seg_end; ++j)
            out[j] = static_cast<scalar_t>(cas * static_cast<opmath_t>(a[j]) + cbs * static_cast<opmath_t>(b[j]));
        }
        i = seg_end;
      }
    }
  });
}

// channels_last [N, C, H, W] stored NHWC with in-kernel noise. A "quad" is 4
// neighbouring pixels along W (W % 4 == 0): its 4*C values are contiguous in
// memory, and for each channel its 4 logical indices form one Philox group.
template <typename scalar_t>
void step_channels_last_philox(const scalar_t* a, const scalar_t* b, scalar_t* out,
                               const at::opmath_type<scalar_t>* ca, const at::opmath_type<scalar_t>* cb,
                               const at::opmath_type<scalar_t>* sd, int64_t N, int64_t C, int64_t H, int64_t W,
                               int64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const int64_t quads_per_row = W / 4, quads = N * H * quads_per_row;
  at::parallel_for(0, quads, std::max<int64_t>(1, kGrain / (4 * C)), [&](int64_t q0, int64_t q1) {
    std::vector<float> eps(4 * C);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t wq = q % quads_per_row, nh = q / quads_per_row, h = nh % H, n = nh / H;
      for (int64_t c = 0; c < C; ++c) {
        const uint64_t group = static_cast<uint64_t>(((n * C + c) * H + h) * quads_per_row + wq);
        philox_normal4(group, k0, k1, eps.data() + 4 * c);
      }
      const opmath_t cas = ca[n], cbs = cb[n], sds = sd[n];
      const int64_t base = q * 4 * C;  // memory offset of the quad
      for (int64_t j = 0; j < 4; ++j)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = base + j * C + c;
          out[i] = static_cast<scalar_t>(cas * static_cast<opmath_t>(a[i]) + cbs * static_cast<opmath_t>(b[i]) +
                                         sds * static_cast<opmath_t>(eps[4 * c + j]));
        }
    }
  });
}

at::Tensor bridge_step_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef_a,
                           const at::Tensor& coef_b, const at::Tensor& std, const std::optional<at::Tensor>& noise,
                           int64_t seed) {
  const bool philox = !noise.has_value() && seed >= 0;
  Prepared p = prepare_bridge_step(a, b, coef_a, coef_b, std, noise, seed);
  at::Tensor out = empty_in_layout(p);
  if (out.numel() == 0) return out;
  const at::Tensor ca = coef_a.contiguous(), cb = coef_b.contiguous(), sd = std.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "bridge_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* pb = p.inputs[1].const_data_ptr<scalar_t>();
    if (philox && p.layout == Layout::kChannelsLast) {
      step_channels_last_philox<scalar_t>(pa, pb, out.mutable_data_ptr<scalar_t>(), ca.const_data_ptr<opmath_t>(),
                                          cb.const_data_ptr<opmath_t>(), sd.const_data_ptr<opmath_t>(), a.size(0),
                                          a.size(1), a.size(2), a.size(3), seed);
    } else {
      const scalar_t* pn = noise.has_value() ? p.inputs[2].const_data_ptr<scalar_t>() : nullptr;
      step_linear<scalar_t>(pa, pb, pn, out.mutable_data_ptr<scalar_t>(), ca.const_data_ptr<opmath_t>(),
                            cb.const_data_ptr<opmath_t>(), sd.const_data_ptr<opmath_t>(), out.numel(), p.per_sample,
                            seed);
    }
  });
  return in_requested_layout(p, out);
}

std::tuple<at::Tensor, at::Tensor> bridge_step_backward_cpu(const at::Tensor& grad, const at::Tensor& coef_a,
                                                            const at::Tensor& coef_b) {
  Prepared p = prepare_bridge_step_backward(grad, coef_a, coef_b);
  at::Tensor grad_a = empty_in_layout(p), grad_b = empty_in_layout(p);
  const int64_t numel = grad.numel(), per_sample = p.per_sample;
  if (numel == 0) return {grad_a, grad_b};
  const at::Tensor ca = coef_a.contiguous(), cb = coef_b.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "bridge_step_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* g = p.inputs[0].const_data_ptr<scalar_t>();
    scalar_t* ga = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
    const opmath_t* pca = ca.const_data_ptr<opmath_t>();
    const opmath_t* pcb = cb.const_data_ptr<opmath_t>();
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t s = i / per_sample, seg_end = std::min(end, (s + 1) * per_sample);
        const opmath_t cas = pca[s], cbs = pcb[s];
        for (int64_t j = i; j < seg_end; ++j) {
          const opmath_t gj = static_cast<opmath_t>(g[j]);
          ga[j] = static_cast<scalar_t>(cas * gj);
          gb[j] = static_cast<scalar_t>(cbs * gj);
        }
        i = seg_end;
      }
    });
  });
  return {in_requested_layout(p, grad_a), in_requested_layout(p, grad_b)};
}

at::Tensor philox_cpu(const at::Tensor& groups, int64_t seed) {
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.dim() == 1,
              "ibmd::philox: groups must be a 1-D int64 tensor, got ", dtype_str(groups), " ", shape_str(groups));
  check_seed(seed, "ibmd::philox");
  const at::Tensor g = groups.contiguous();
  at::Tensor out = at::empty({g.size(0), 4}, g.options());
  const int64_t* pg = g.const_data_ptr<int64_t>();
  int64_t* po = out.mutable_data_ptr<int64_t>();
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  for (int64_t i = 0; i < g.size(0); ++i) {
    const uint64_t c = static_cast<uint64_t>(pg[i]);
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k0, k1);
    for (int j = 0; j < 4; ++j) po[4 * i + j] = static_cast<int64_t>(w.x[j]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ibmd, CPU, m) {
  m.impl("bridge_step", &bridge_step_cpu);
  m.impl("bridge_step_backward", &bridge_step_backward_cpu);
  m.impl("philox", &philox_cpu);
}

}  // namespace ibmd

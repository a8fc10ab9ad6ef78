// CUDA kernels of ibmd::bridge_step, its backward, and ibmd::philox.
//
// One pass over memory: read a and b (and noise, when given), write out; the
// in-kernel noise is Philox4x32-10 + Box-Muller (csrc/philox.h), four normals
// per thread from one Philox call, so no noise tensor is ever written or read.
#include <torch/library.h>

#include "../checks.h"
#include "../philox.h"
#include "common.cuh"

namespace ibmd {
namespace cuda {
namespace {

enum class Eps { kNone, kTensor, kPhilox };

// Contiguous or channels_last with explicit/no noise, or contiguous with
// Philox noise; D % 4 == 0 and aligned pointers. Thread = 4 elements of one
// sample (in memory order; for Philox memory order is the logical order).
template <typename scalar_t, Eps kEps>
__global__ void __launch_bounds__(kThreads) step_vec_kernel(const scalar_t* __restrict__ a,
                                                            const scalar_t* __restrict__ b,
                                                            const scalar_t* __restrict__ noise,
                                                            scalar_t* __restrict__ out,
                                                            const at::opmath_type<scalar_t>* __restrict__ ca,
                                                            const at::opmath_type<scalar_t>* __restrict__ cb,
                                                            const at::opmath_type<scalar_t>* __restrict__ sd,
                                                            int64_t batch, int64_t quads_per_sample, uint32_t k0,
                                                            uint32_t k1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= quads_per_sample) return;
  for (int64_t s = blockIdx.y; s < batch; s += gridDim.y) {
    const int64_t quad = s * quads_per_sample + q;
    const int64_t i = quad * kVec;
    const Vec4<scalar_t> va = load4(a + i), vb = load4(b + i);
    const opmath_t cas = ca[s], cbs = cb[s], sds = sd[s];
    float eps[kVec] = {0.f, 0.f, 0.f, 0.f};
    Vec4<scalar_t> vn;
    if constexpr (kEps == Eps::kPhilox) philox_normal4(static_cast<uint64_t>(quad), k0, k1, eps);
    if constexpr (kEps == Eps::kTensor) vn = load4(noise + i);
    Vec4<scalar_t> vo;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      opmath_t o = cas * static_cast<opmath_t>(va.v[j]) + cbs * static_cast<opmath_t>(vb.v[j]);
      if constexpr (kEps == Eps::kPhilox) o += sds * static_cast<opmath_t>(eps[j]);
      if constexpr (kEps == Eps::kTensor) o += sds * static_cast<opmath_t>(vn.v[j]);
      vo.v[j] = static_cast<scalar_t>(o);
    }
    store4(out + i, vo);
  }
}

// Any D, any alignment, memory order == logical order (contiguous), or
// explicit/no noise in any dense layout. Thread = one Philox group of 4.
template <typename scalar_t, typename index_t, Eps kEps>
__global__ void __launch_bounds__(kThreads) step_flat_kernel(const scalar_t* __restrict__ a,
                                                             const scalar_t* __restrict__ b,
                                                             const scalar_t* __restrict__ noise,
                                                             scalar_t* __restrict__ out,
                                                             const at::opmath_type<scalar_t>* __restrict__ ca,
                                                             const at::opmath_type<scalar_t>* __restrict__ cb,
                                                             const at::opmath_type<scalar_t>* __restrict__ sd,
                                                             index_t numel, index_t per_sample, uint32_t k0,
                                                             uint32_t k1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t groups = (numel + kVec - 1) / kVec;
  for (index_t g = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<index_t>(gridDim.x) * blockDim.x) {
    float eps[kVec] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (kEps == Eps::kPhilox) philox_normal4(static_cast<uint64_t>(g), k0, k1, eps);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const index_t i = g * kVec + j;
      if (i < numel) {
        const index_t s = i / per_sample;
        opmath_t o = ca[s] * static_cast<opmath_t>(a[i]) + cb[s] * static_cast<opmath_t>(b[i]);
        if constexpr (kEps == Eps::kPhilox) o += sd[s] * static_cast<opmath_t>(eps[j]);
        if constexpr (kEps == Eps::kTensor) o += sd[s] * static_cast<opmath_t>(noise[i]);
        out[i] = static_cast<scalar_t>(o);
      }
    }
  }
}

// channels_last [N, C, H, W] (NHWC memory), W % 4 == 0, Philox noise. Thread =
// one channel of a quad of 4 pixels along W: one Philox group, 4 elements at
// stride C. Neighbouring threads take neighbouring channels, so a warp covers
// contiguous memory.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) step_channels_last_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
    const at::opmath_type<scalar_t>* __restrict__ ca, const at::opmath_type<scalar_t>* __restrict__ cb,
    const at::opmath_type<scalar_t>* __restrict__ sd, index_t C, index_t H, index_t quads_per_row, index_t items,
    uint32_t k0, uint32_t k1) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < items;
       t += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = t % C, q = t / C;  // q = (n H + h) quads_per_row + wq
    const index_t wq = q % quads_per_row, nh = q / quads_per_row;
    const index_t h = nh % H, n = nh / H;
    const uint64_t group = static_cast<uint64_t>(((n * C + c) * H + h) * quads_per_row + wq);
    float eps[kVec];
    philox_normal4(group, k0, k1, eps);
    const opmath_t cas = ca[n], cbs = cb[n], sds = sd[n];
    const index_t base = q * kVec * C + c;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const index_t i = base + j * C;
      out[i] = static_cast<scalar_t>(cas * static_cast<opmath_t>(a[i]) + cbs * static_cast<opmath_t>(b[i]) +
                                     sds * static_cast<opmath_t>(eps[j]));
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) step_backward_vec_kernel(const scalar_t* __restrict__ grad,
                                                                     scalar_t* __restrict__ grad_a,
                                                                     scalar_t* __restrict__ grad_b,
                                                                     const at::opmath_type<scalar_t>* __restrict__ ca,
                                                                     const at::opmath_type<scalar_t>* __restrict__ cb,
                                                                     int64_t batch, int64_t quads_per_sample) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= quads_per_sample) return;
  for (int64_t s = blockIdx.y; s < batch; s += gridDim.y) {
    const int64_t i = (s * quads_per_sample + q) * kVec;
    const Vec4<scalar_t> g = load4(grad + i);
    const opmath_t cas = ca[s], cbs = cb[s];
    Vec4<scalar_t> oa, ob;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      oa.v[j] = static_cast<scalar_t>(cas * static_cast<opmath_t>(g.v[j]));
      ob.v[j] = static_cast<scalar_t>(cbs * static_cast<opmath_t>(g.v[j]));
    }
    store4(grad_a + i, oa);
    store4(grad_b + i, ob);
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) step_backward_flat_kernel(const scalar_t* __restrict__ grad,
                                                                      scalar_t* __restrict__ grad_a,
                                                                      scalar_t* __restrict__ grad_b,
                                                                      const at::opmath_type<scalar_t>* __restrict__ ca,
                                                                      const at::opmath_type<scalar_t>* __restrict__ cb,
                                                                      index_t numel, index_t per_sample) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t s = i / per_sample;
    const opmath_t g = static_cast<opmath_t>(grad[i]);
    grad_a[i] = static_cast<scalar_t>(ca[s] * g);
    grad_b[i] = static_cast<scalar_t>(cb[s] * g);
  }
}

__global__ void philox_kernel(const int64_t* __restrict__ groups, int64_t* __restrict__ out, int64_t n, uint32_t k0,
                              uint32_t k1) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t c = static_cast<uint64_t>(groups[i]);
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k0, k1);
  for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<int64_t>(w.x[j]);
}

template <typename scalar_t, typename index_t, Eps kEps>
void launch_flat(const Prepared& p, const scalar_t* pn, at::Tensor& out, const at::Tensor& ca, const at::Tensor& cb,
                 const at::Tensor& sd, uint32_t k0, uint32_t k1, cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t numel = out.numel();
  step_flat_kernel<scalar_t, index_t, kEps><<<flat_blocks((numel + kVec - 1) / kVec), kThreads, 0, stream>>>(
      p.inputs[0].const_data_ptr<scalar_t>(), p.inputs[1].const_data_ptr<scalar_t>(), pn,
      out.mutable_data_ptr<scalar_t>(), ca.const_data_ptr<opmath_t>(), cb.const_data_ptr<opmath_t>(),
      sd.const_data_ptr<opmath_t>(), static_cast<index_t>(numel), static_cast<index_t>(p.per_sample), k0, k1);
}

at::Tensor bridge_step_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef_a,
                            const at::Tensor& coef_b, const at::Tensor& std, const std::optional<at::Tensor>& noise,
                            int64_t seed) {
  const bool philox = !noise.has_value() && seed >= 0;
  Prepared p = prepare_bridge_step(a, b, coef_a, coef_b, std, noise, seed);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = empty_in_layout(p);
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const at::Tensor ca = coef_a.contiguous(), cb = coef_b.contiguous(), sd = std.contiguous();
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool small = numel < (int64_t(1) << 31) - 64;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "bridge_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* pb = p.inputs[1].const_data_ptr<scalar_t>();
    const scalar_t* pn = noise.has_value() ? p.inputs[2].const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (philox && p.layout == Layout::kChannelsLast) {
      const int64_t C = a.size(1), H = a.size(2), quads_per_row = a.size(3) / kVec;
      const int64_t items = numel / kVec;
      auto launch = [&](auto index_zero) {
        using index_t = decltype(index_zero);
        step_channels_last_kernel<scalar_t, index_t><<<flat_blocks(items), kThreads, 0, stream>>>(
            pa, pb, po, ca.const_data_ptr<opmath_t>(), cb.const_data_ptr<opmath_t>(), sd.const_data_ptr<opmath_t>(),
            static_cast<index_t>(C), static_cast<index_t>(H), static_cast<index_t>(quads_per_row),
            static_cast<index_t>(items), k0, k1);
      };
      small ? launch(uint32_t(0)) : launch(int64_t(0));
    } else if (p.per_sample % kVec == 0 && vec_aligned<scalar_t>({pa, pb, pn ? pn : pa, po})) {
      const int64_t quads = p.per_sample / kVec;
      const dim3 grid = per_sample_grid(quads, p.batch);
      const opmath_t *pca = ca.const_data_ptr<opmath_t>(), *pcb = cb.const_data_ptr<opmath_t>(),
                     *psd = sd.const_data_ptr<opmath_t>();
      if (philox)
        step_vec_kernel<scalar_t, Eps::kPhilox>
            <<<grid, kThreads, 0, stream>>>(pa, pb, pn, po, pca, pcb, psd, p.batch, quads, k0, k1);
      else if (pn != nullptr)
        step_vec_kernel<scalar_t, Eps::kTensor>
            <<<grid, kThreads, 0, stream>>>(pa, pb, pn, po, pca, pcb, psd, p.batch, quads, k0, k1);
      else
        step_vec_kernel<scalar_t, Eps::kNone>
            <<<grid, kThreads, 0, stream>>>(pa, pb, pn, po, pca, pcb, psd, p.batch, quads, k0, k1);
    } else {
      auto launch = [&](auto index_zero) {
        using index_t = decltype(index_zero);
        if (philox)
          launch_flat<scalar_t, index_t, Eps::kPhilox>(p, pn, out, ca, cb, sd, k0, k1, stream);
        else if (pn != nullptr)
          launch_flat<scalar_t, index_t, Eps::kTensor>(p, pn, out, ca, cb, sd, k0, k1, stream);
        else
          launch_flat<scalar_t, index_t, Eps::kNone>(p, pn, out, ca, cb, sd, k0, k1, stream);
      };
      small ? launch(uint32_t(0)) : launch(int64_t(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in_requested_layout(p, out);
}

std::tuple<at::Tensor, at::Tensor> bridge_step_backward_cuda(const at::Tensor& grad, const at::Tensor& coef_a,
                                                             const at::Tensor& coef_b) {
  Prepared p = prepare_bridge_step_backward(grad, coef_a, coef_b);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_a = empty_in_layout(p), grad_b = empty_in_layout(p);
  const int64_t numel = grad.numel();
  if (numel == 0) return {grad_a, grad_b};
  const at::Tensor ca = coef_a.contiguous(), cb = coef_b.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "bridge_step_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* pg = p.inputs[0].const_data_ptr<scalar_t>();
    scalar_t *pga = grad_a.mutable_data_ptr<scalar_t>(), *pgb = grad_b.mutable_data_ptr<scalar_t>();
    if (p.per_sample % kVec == 0 && vec_aligned<scalar_t>({pg, pga, pgb})) {
      const int64_t quads = p.per_sample / kVec;
      step_backward_vec_kernel<scalar_t><<<per_sample_grid(quads, p.batch), kThreads, 0, stream>>>(
          pg, pga, pgb, ca.const_data_ptr<opmath_t>(), cb.const_data_ptr<opmath_t>(), p.batch, quads);
    } else {
      step_backward_flat_kernel<scalar_t, int64_t><<<flat_blocks(numel), kThreads, 0, stream>>>(
          pg, pga, pgb, ca.const_data_ptr<opmath_t>(), cb.const_data_ptr<opmath_t>(), numel, p.per_sample);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in_requested_layout(p, grad_a), in_requested_layout(p, grad_b)};
}

at::Tensor philox_cuda(const at::Tensor& groups, int64_t seed) {
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.dim() == 1,
              "ibmd::philox: groups must be a 1-D int64 tensor, got ", dtype_str(groups), " ", shape_str(groups));
  check_seed(seed, "ibmd::philox");
  const c10::cuda::CUDAGuard guard(groups.device());
  const at::Tensor g = groups.contiguous();
  at::Tensor out = at::empty({g.size(0), 4}, g.options());
  if (g.numel() == 0) return out;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  philox_kernel<<<flat_blocks(g.size(0)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), g.size(0), k0, k1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ibmd, CUDA, m) {
  m.impl("bridge_step", &cuda::bridge_step_cuda);
  m.impl("bridge_step_backward", &cuda::bridge_step_backward_cuda);
  m.impl("philox", &cuda::philox_cuda);
}

}  // namespace ibmd

// CUDA kernels of the fused noise-conditioned losses (MATH.md 6).
//
// Forward: grid (chunks, B); each block sums a fixed chunk of one sample in
// float32 (float64 for float64 inputs) and writes a partial; a second kernel
// adds a sample's partials in a fixed order. No atomics: results are
// deterministic. Backward: one pass, each input read once, each gradient
// written once. An optional mask (same shape as the inputs; ibmd_fast/ops.py
// broadcasts it) weights each element: L_b = w_b sum_i m_bi term_bi / D.
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "common.cuh"

namespace ibmd {
namespace cuda {
namespace {

constexpr int kItersPerThread = 8;
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kItersPerThread;  // elements per block

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (warp == 0) {
    total = lane < kThreads / 32 ? warp_sums[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  return total;  // valid in thread 0
}

// The per-element terms of the two losses.
struct BridgeTerm {
  template <typename acc_t>
  __device__ __forceinline__ static acc_t term(acc_t pred, acc_t target, acc_t) {
    const acc_t d = pred - target;
    return d * d;
  }
};
struct IbmdTerm {  // inputs (x0, teacher, fake)
  template <typename acc_t>
  __device__ __forceinline__ static acc_t term(acc_t x, acc_t t, acc_t f) {
    const acc_t dt = t - x, df = f - x;
    return dt * dt - df * df;
  }
};

template <typename scalar_t, typename Term, int kInputs, bool kMasked, bool kVectorized>
__global__ void __launch_bounds__(kThreads) partial_sum_kernel(const scalar_t* __restrict__ in0,
                                                               const scalar_t* __restrict__ in1,
                                                               const scalar_t* __restrict__ in2,
                                                               const scalar_t* __restrict__ mask,
                                                               at::opmath_type<scalar_t>* __restrict__ partial,
                                                               int64_t batch, int64_t per_sample, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunk = blockIdx.x;
  const int64_t begin_in_sample = chunk * kChunk;
  const int64_t end_in_sample = min(begin_in_sample + kChunk, per_sample);
  for (int64_t s = blockIdx.y; s < batch; s += gridDim.y) {
    const int64_t base = s * per_sample;
    acc_t acc = 0;
    if constexpr (kVectorized) {
#pragma unroll
      for (int it = 0; it < kItersPerThread; ++it) {
        const int64_t i = begin_in_sample + (int64_t(it) * kThreads + threadIdx.x) * kVec;
        if (i < end_in_sample) {
          const Vec4<scalar_t> x0 = load4(in0 + base + i), x1 = load4(in1 + base + i);
          Vec4<scalar_t> x2, m;
          if constexpr (kInputs == 3) x2 = load4(in2 + base + i);
          if constexpr (kMasked) m = load4(mask + base + i);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const acc_t v = Term::template term<acc_t>(static_cast<acc_t>(x0.v[j]), static_cast<acc_t>(x1.v[j]),
                                                       kInputs == 3 ? static_cast<acc_t>(x2.v[j]) : acc_t(0));
            if constexpr (kMasked)
              acc += static_cast<acc_t>(m.v[j]) * v;
            else
              acc += v;
          }
        }
      }
    } else {
      for (int64_t i = begin_in_sample + threadIdx.x; i < end_in_sample; i += kThreads) {
        const acc_t v = Term::template term<acc_t>(static_cast<acc_t>(in0[base + i]), static_cast<acc_t>(in1[base + i]),
                                                   kInputs == 3 ? static_cast<acc_t>(in2[base + i]) : acc_t(0));
        if constexpr (kMasked)
          acc += static_cast<acc_t>(mask[base + i]) * v;
        else
          acc += v;
      }
    }
    const acc_t total = block_sum(acc);
    if (threadIdx.x == 0) partial[s * chunks + chunk] = total;
    __syncthreads();  // warp_sums is reused by the next sample
  }
}

// loss[s] = w[s] / D * sum_k partial[s, k], summed in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(const acc_t* __restrict__ partial,
                                                          const acc_t* __restrict__ weight, acc_t* __restrict__ loss,
                                                          int64_t chunks, int64_t per_sample) {
  const int64_t s = blockIdx.x;
  acc_t acc = 0;
  for (int64_t k = threadIdx.x; k < chunks; k += kThreads) acc += partial[s * chunks + k];
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) loss[s] = weight[s] * total / static_cast<acc_t>(per_sample);
}

// p.inputs: the kInputs inputs, then the mask when masked.
template <typename Term, int kInputs>
at::Tensor per_sample_loss(const Prepared& p, const at::Tensor& weight, bool masked, const char* name) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = p.batch, D = p.per_sample;
  const int64_t chunks = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  TORCH_CHECK(chunks < (int64_t(1) << 31), name, ": sample too large");
  at::Tensor loss = at::empty({B}, weight.options());
  if (B == 0) return loss;
  at::Tensor partial = at::empty({B, chunks}, weight.options());
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.inputs[0].scalar_type(), "per_sample_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in0 = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* in1 = p.inputs[1].const_data_ptr<scalar_t>();
    const scalar_t* in2 = kInputs == 3 ? p.inputs[2].const_data_ptr<scalar_t>() : in0;
    const scalar_t* m = masked ? p.inputs[kInputs].const_data_ptr<scalar_t>() : in0;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(B, 65535)));
    acc_t* out = partial.mutable_data_ptr<acc_t>();
    const bool vectorized = D % kVec == 0 && vec_aligned<scalar_t>({in0, in1, in2, m});
    if (masked && vectorized)
      partial_sum_kernel<scalar_t, Term, kInputs, true, true><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, out,
                                                                                             B, D, chunks);
    else if (masked)
      partial_sum_kernel<scalar_t, Term, kInputs, true, false><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, out,
                                                                                              B, D, chunks);
    else if (vectorized)
      partial_sum_kernel<scalar_t, Term, kInputs, false, true><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, out,
                                                                                              B, D, chunks);
    else
      partial_sum_kernel<scalar_t, Term, kInputs, false, false><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, out,
                                                                                               B, D, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>(), chunks, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

// ---------------------------------------------------------------------------
// Backward. k = 2 w g m / D per element (m = 1 without a mask); bridge: (k (p - t), -k (p - t));
// ibmd, inputs (x, t, f): (k (t - x), k (x - f), k (f - t)) for (t, f, x).

template <typename scalar_t, bool kIbmd, bool kMasked, bool kVectorized>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(
    const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1, const scalar_t* __restrict__ in2,
    const scalar_t* __restrict__ mask, scalar_t* __restrict__ out0, scalar_t* __restrict__ out1, scalar_t* __restrict__ out2,
    const at::opmath_type<scalar_t>* __restrict__ grad, const at::opmath_type<scalar_t>* __restrict__ weight,
    int64_t batch, int64_t per_sample) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = kVectorized ? kVec : 1;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item * width >= per_sample) return;
  for (int64_t s = blockIdx.y; s < batch; s += gridDim.y) {
    const acc_t k_sample = acc_t(2) * weight[s] * grad[s] / static_cast<acc_t>(per_sample);
    const int64_t i = s * per_sample + item * width;
    auto body = [&](acc_t a, acc_t b, acc_t c, acc_t m, scalar_t& o0, scalar_t& o1, scalar_t& o2) {
      const acc_t k = kMasked ? k_sample * m : k_sample;
      if constexpr (kIbmd) {  // a = x0, b = teacher, c = fake; outputs (teacher, fake, x0)
        o0 = static_cast<scalar_t>(k * (b - a));
        o1 = static_cast<scalar_t>(k * (a - c));
        o2 = static_cast<scalar_t>(k * (c - b));
      } else {  // a = pred, b = target
        const acc_t g = k * (a - b);
        o0 = static_cast<scalar_t>(g);
        o1 = static_cast<scalar_t>(-g);
      }
    };
    if constexpr (kVectorized) {
      const Vec4<scalar_t> x0 = load4(in0 + i), x1 = load4(in1 + i);
      Vec4<scalar_t> x2, mv, y0, y1, y2;
      if constexpr (kIbmd) x2 = load4(in2 + i);
      if constexpr (kMasked) mv = load4(mask + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        body(static_cast<acc_t>(x0.v[j]), static_cast<acc_t>(x1.v[j]), kIbmd ? static_cast<acc_t>(x2.v[j]) : acc_t(0),
             kMasked ? static_cast<acc_t>(mv.v[j]) : acc_t(1), y0.v[j], y1.v[j], y2.v[j]);
      store4(out0 + i, y0);
      store4(out1 + i, y1);
      if constexpr (kIbmd) store4(out2 + i, y2);
    } else {
      scalar_t dummy;
      body(static_cast<acc_t>(in0[i]), static_cast<acc_t>(in1[i]), kIbmd ? static_cast<acc_t>(in2[i]) : acc_t(0),
           kMasked ? static_cast<acc_t>(mask[i]) : acc_t(1), out0[i], out1[i], kIbmd ? out2[i] : dummy);
    }
  }
}

// p.inputs: the inputs (2 or 3), then the mask when masked.
template <bool kIbmd>
void launch_backward(const Prepared& p, std::vector<at::Tensor>& outs, const at::Tensor& grad,
                     const at::Tensor& weight, bool masked, const char* name) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = p.batch, D = p.per_sample;
  if (B == 0 || D == 0) return;
  const at::Tensor g = grad.contiguous().to(weight.scalar_type()), w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.inputs[0].scalar_type(), "loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in0 = p.inputs[0].const_data_ptr<scalar_t>();
    const scalar_t* in1 = p.inputs[1].const_data_ptr<scalar_t>();
    const scalar_t* in2 = kIbmd ? p.inputs[2].const_data_ptr<scalar_t>() : in0;
    scalar_t* o0 = outs[0].mutable_data_ptr<scalar_t>();
    scalar_t* o1 = outs[1].mutable_data_ptr<scalar_t>();
    scalar_t* o2 = kIbmd ? outs[2].mutable_data_ptr<scalar_t>() : o0;
    const scalar_t* m = masked ? p.inputs[kIbmd ? 3 : 2].const_data_ptr<scalar_t>() : in0;
    const acc_t* pg = g.const_data_ptr<acc_t>();
    const acc_t* pw = w.const_data_ptr<acc_t>();
    const bool vectorized = D % kVec == 0 && vec_aligned<scalar_t>({in0, in1, in2, m, o0, o1, o2});
    const dim3 grid = per_sample_grid(vectorized ? D / kVec : D, B);
    if (masked && vectorized)
      loss_backward_kernel<scalar_t, kIbmd, true, true><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, o0, o1, o2,
                                                                                       pg, pw, B, D);
    else if (masked)
      loss_backward_kernel<scalar_t, kIbmd, true, false><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, o0, o1, o2,
                                                                                        pg, pw, B, D);
    else if (vectorized)
      loss_backward_kernel<scalar_t, kIbmd, false, true><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, o0, o1,
                                                                                        o2, pg, pw, B, D);
    else
      loss_backward_kernel<scalar_t, kIbmd, false, false><<<grid, kThreads, 0, stream>>>(in0, in1, in2, m, o0, o1,
                                                                                         o2, pg, pw, B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bridge_loss_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                            const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::bridge_loss";
  Prepared p = prepare_loss({{&pred, "pred"}, {&target, "target"}}, mask, op);
  check_coef(weight, pred, op, "weight");
  return per_sample_loss<BridgeTerm, 2>(p, weight, mask.has_value(), op);
}

std::tuple<at::Tensor, at::Tensor> bridge_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred,
                                                             const at::Tensor& target, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::bridge_loss_backward";
  Prepared p = prepare_loss({{&pred, "pred"}, {&target, "target"}}, mask, op);
  check_coef(weight, pred, op, "weight");
  check_loss_grad(grad, p, weight, op);
  std::vector<at::Tensor> outs = {empty_in_layout(p), empty_in_layout(p)};
  launch_backward<false>(p, outs, grad, weight, mask.has_value(), op);
  return {in_requested_layout(p, outs[0]), in_requested_layout(p, outs[1])};
}

at::Tensor ibmd_loss_cuda(const at::Tensor& teacher_pred, const at::Tensor& fake_pred, const at::Tensor& x0,
                          const at::Tensor& weight, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::ibmd_loss";
  Prepared p = prepare_loss({{&x0, "x0"}, {&teacher_pred, "teacher_pred"}, {&fake_pred, "fake_pred"}}, mask, op);
  check_coef(weight, x0, op, "weight");
  return per_sample_loss<IbmdTerm, 3>(p, weight, mask.has_value(), op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ibmd_loss_backward_cuda(const at::Tensor& grad,
                                                                       const at::Tensor& teacher_pred,
                                                                       const at::Tensor& fake_pred,
                                                                       const at::Tensor& x0,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "ibmd::ibmd_loss_backward";
  Prepared p = prepare_loss({{&x0, "x0"}, {&teacher_pred, "teacher_pred"}, {&fake_pred, "fake_pred"}}, mask, op);
  check_coef(weight, x0, op, "weight");
  check_loss_grad(grad, p, weight, op);
  std::vector<at::Tensor> outs = {empty_in_layout(p), empty_in_layout(p), empty_in_layout(p)};
  launch_backward<true>(p, outs, grad, weight, mask.has_value(), op);
  return {in_requested_layout(p, outs[0]), in_requested_layout(p, outs[1]), in_requested_layout(p, outs[2])};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ibmd, CUDA, m) {
  m.impl("bridge_loss", &cuda::bridge_loss_cuda);
  m.impl("bridge_loss_backward", &cuda::bridge_loss_backward_cuda);
  m.impl("ibmd_loss", &cuda::ibmd_loss_cuda);
  m.impl("ibmd_loss_backward", &cuda::ibmd_loss_backward_cuda);
}

}  // namespace ibmd

// Fused PowerNorm / Unified Normalization training kernels for XLA:CPU.
//
// Built with cpu_kernel.cc into one library by normjax/_src/cpu_kernel.py and
// driven by normjax/_src/power_kernel.py. x is [rows, C] float32 (leading
// axes flattened). G groups of C/G features; G = 0 means no GroupScaling,
// where rs is [rows, 1] and holds 1. Per row i and group g:
//
//   xs = x * rs,  rs[i, g] = 1 / sqrt(mean_{j in g}(x^2) + gs_eps)
//   z  = xs * inv_d                                          (inv_d: [C])
//
// PowerStats:    rs, and sq = sum_i w_i xs^2                  (pass 1 of 2)
// PowerApply:    y = z * scale + bias                         (pass 2 of 2)
// PowerBackward: g_hat = dy * scale - corr * z * cw_i,
//                du = sum_i cw_i g_hat z, dscale = sum_i dy z, dbias = sum_i dy,
//                dxs = g_hat * inv_bd, dx = rs (dxs - xs mean_g(dxs xs))
//                (the GroupScaling VJP; dx = dxs without GroupScaling)
// PowerColumns:  du, dscale, dbias of PowerBackward with corr = 0, no dx
//                (the first backward pass of UN, whose correction needs du).
// Each is one pass over memory; a row stays in L1 between its loops. Column
// sums are accumulated per thread and added in a fixed order.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "kernel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using normjax::LastDim;
using normjax::NumThreads;
using normjax::ParallelRows;

// Per-thread column partial sums lie Stride(c) floats apart: not a multiple
// of 4 KiB, so that their stores do not alias (in the low 12 address bits)
// the row loads and stores of the same j, which costs about 2x in the
// backward pass.
int64_t Stride(int64_t c) { return c + 48; }

// out[k][j] = sum over threads of part[(t * k_count + k) * Stride(c) + j].
void SumPartials(const std::vector<float>& part, int threads, int k_count,
                 int64_t c, float* const* out) {
  const int64_t stride = Stride(c);
  for (int k = 0; k < k_count; ++k) {
    if (out[k] == nullptr) continue;
    for (int64_t j = 0; j < c; ++j) {
      float s = 0.0f;
      for (int t = 0; t < threads; ++t) s += part[(t * k_count + k) * stride + j];
      out[k][j] = s;
    }
  }
}

ffi::Error Stats(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> rs, ffi::ResultBuffer<ffi::F32> sq,
                 int64_t groups, float gs_eps) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  const int64_t ng = std::max<int64_t>(groups, 1);
  const int64_t cg = c / ng;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* rp = rs->typed_data();
  const int threads = NumThreads(n * c);
  std::vector<float> partial(static_cast<size_t>(threads * Stride(c)), 0.0f);
  float* part = partial.data();
  ParallelRows(n, threads, [=](int t, int64_t lo, int64_t hi) {
    float* acc = part + t * Stride(c);
    for (int64_t i = lo; i < hi; ++i) {
      const float* xr = xp + i * c;
      const float wi = wp[i];
      for (int64_t g = 0; g < ng; ++g) {
        const float* xg = xr + g * cg;
        float r = 1.0f;
        if (groups > 0) {
          float q = 0.0f;
#pragma omp simd reduction(+ : q)
          for (int64_t j = 0; j < cg; ++j) q += xg[j] * xg[j];
          r = 1.0f / std::sqrt(q / static_cast<float>(cg) + gs_eps);
        }
        rp[i * ng + g] = r;
        if (wi == 0.0f) continue;  // a pad: a NaN there must not enter psi2
        const float wr2 = wi * r * r;
        float* ag = acc + g * cg;
#pragma omp simd
        for (int64_t j = 0; j < cg; ++j) ag[j] += wr2 * (xg[j] * xg[j]);
      }
    }
  });
  float* out[1] = {sq->typed_data()};
  SumPartials(partial, threads, 1, c, out);
  return ffi::Error::Success();
}

ffi::Error Apply(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                 ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> scale,
                 ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  const int64_t ng = LastDim(rs.dimensions());
  const int64_t cg = c / ng;
  const float* xp = x.typed_data();
  const float* rp = rs.typed_data();
  const float* dp = inv_d.typed_data();
  const float* sp = scale.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  ParallelRows(n, NumThreads(n * c), [=](int, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t o = i * c + g * cg;
        const float r = rp[i * ng + g];
#pragma omp simd
        for (int64_t j = 0; j < cg; ++j) {
          const int64_t k = g * cg + j;
          yp[o + j] = (xp[o + j] * r) * dp[k] * sp[k] + bp[k];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// PowerBackward (kDx) or PowerColumns (no correction, no dx). The options
// are template parameters so that each inner loop is branch-free.
template <bool kDx, bool kGroupScaled>
void BackwardImpl(const float* __restrict xp, const float* __restrict rp,
                  int64_t ng, const float* __restrict dp,
                  const float* __restrict bdp, const float* __restrict sp,
                  const float* __restrict cp, const float* __restrict cwp,
                  const float* __restrict gp, int64_t n, int64_t c,
                  float* __restrict dxp, float* dup, float* dsp, float* dbp) {
  const int64_t cg = c / ng;
  const int threads = NumThreads(n * c);
  std::vector<float> partial(static_cast<size_t>(3 * threads * Stride(c)),
                             0.0f);
  float* part = partial.data();
  ParallelRows(n, threads, [=](int t, int64_t lo, int64_t hi) {
    float* __restrict du = part + 3 * t * Stride(c);
    float* __restrict ds = du + Stride(c);
    float* __restrict db = ds + Stride(c);
    for (int64_t i = lo; i < hi; ++i) {
      const float* __restrict xr = xp + i * c;
      const float* __restrict gr = gp + i * c;
      const float cw = cwp[i];
      for (int64_t g = 0; g < ng; ++g) {
        const float r = rp[i * ng + g];
        const int64_t o = g * cg;  // this group's slice of the row
        const float* __restrict xg = xr + o;
        const float* __restrict gg = gr + o;
        const float* __restrict dg = dp + o;
        const float* __restrict sg = sp + o;
        const float* __restrict cg_ = kDx ? cp + o : nullptr;
        const float* __restrict bg = kDx ? bdp + o : nullptr;
        float* __restrict ug = du + o;
        float* __restrict vg = ds + o;
        float* __restrict wg = db + o;
        float a = 0.0f;  // sum over the group of dxs xs
#pragma omp simd reduction(+ : a)
        for (int64_t j = 0; j < cg; ++j) {
          const float xs = xg[j] * r;
          const float z = xs * dg[j];
          const float gy = gg[j];
          const float gh = kDx ? gy * sg[j] - cg_[j] * z * cw : gy * sg[j];
          ug[j] += cw != 0.0f ? cw * gh * z : 0.0f;  // pads: NaN-proof
          vg[j] += gy * z;
          wg[j] += gy;
          if (kDx && kGroupScaled) a += gh * bg[j] * xs;
        }
        if (!kDx) continue;
        // dxs = g_hat * inv_bd, then GroupScaling's VJP; the row is in L1.
        float* __restrict dr = dxp + i * c + o;
        const float m = kGroupScaled ? a / static_cast<float>(cg) : 0.0f;
        const float rr = kGroupScaled ? r : 1.0f;
#pragma omp simd
        for (int64_t j = 0; j < cg; ++j) {
          const float xs = xg[j] * r;
          const float gh = gg[j] * sg[j] - cg_[j] * xs * dg[j] * cw;
          dr[j] = rr * (gh * bg[j] - xs * m);
        }
      }
    }
  });
  float* out[3] = {dup, dsp, dbp};
  SumPartials(partial, threads, 3, c, out);
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                    ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> inv_bd,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> corr,
                    ffi::Buffer<ffi::F32> cw, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> du,
                    ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, bool group_scaled) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  auto impl = group_scaled ? BackwardImpl<true, true>
                           : BackwardImpl<true, false>;
  impl(x.typed_data(), rs.typed_data(), LastDim(rs.dimensions()),
       inv_d.typed_data(), inv_bd.typed_data(), scale.typed_data(),
       corr.typed_data(), cw.typed_data(), dy.typed_data(), n, c,
       dx->typed_data(), du->typed_data(), dscale->typed_data(),
       dbias->typed_data());
  return ffi::Error::Success();
}

ffi::Error Columns(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                   ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> cw, ffi::Buffer<ffi::F32> dy,
                   ffi::ResultBuffer<ffi::F32> du,
                   ffi::ResultBuffer<ffi::F32> dscale,
                   ffi::ResultBuffer<ffi::F32> dbias) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  BackwardImpl<false, false>(
      x.typed_data(), rs.typed_data(), LastDim(rs.dimensions()),
      inv_d.typed_data(), nullptr, scale.typed_data(), nullptr,
      cw.typed_data(), dy.typed_data(), n, c, nullptr, du->typed_data(),
      dscale->typed_data(), dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerStats, Stats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sq
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("gs_eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerApply, Apply,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_bd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // corr
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cw
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<bool>("group_scaled"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerColumns, Columns,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cw
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias

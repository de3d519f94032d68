// Fused column-statistics norm kernels for XLA:CPU: PowerNorm, UN, PN-V,
// BatchNorm and the PowerNorm paper's BN baseline.
//
// Built with cpu_kernel.cc into one library by normjax/_src/cpu_kernel.py and
// driven by normjax/_src/power_kernel.py. x is [rows, C] float32 (leading
// axes flattened). G groups of C/G features; G = 0 means no GroupScaling,
// where rs is [rows, 1] and holds 1. Per row i and group g:
//
//   a  = x * rs,  rs[i, g] = 1 / sqrt(mean_{j in g}(x^2) + gs_eps)
//   zh = (a - mu) * inv_d,  z = keep_i * zh       (mu, inv_d: [C])
//
// PowerStats:    rs, sq = sum_i w_i (a - k)^2 and s1 = sum_i w_i (a - k)
//                (k [C] a shift, one real row, so that the variance keeps
//                its precision; s1 only when centred)          (pass 1 of 2)
// PowerApply:    y = z * scale + bias                         (pass 2 of 2)
// PowerBackward: g_hat = keep_i dy scale - cw_i (e + corr zh),
//                du = sum_i cw_i g_hat zh, dscale = sum_i dy z, dbias = sum_i dy,
//                dk = sum_i keep_i dy (with per-row keep only; a row with
//                keep 0 gives y = bias and dx = 0 whatever x holds there),
//                da = g_hat * inv_bd, dx = rs (da - a mean_g(da a))
//                (the GroupScaling VJP; dx = da without GroupScaling)
// PowerColumns:  du, dscale, dbias (, dk) of PowerBackward with corr = e = 0,
//                no dx (the first backward pass of the exact batch norms and
//                UN, whose second pass needs these sums).
// PowerNorm: mu = 0, keep = 1, e = 0. BatchNorm's exact gradient is the
// second pass with cw = w, e = sum(keep g) / n, corr = sum(keep g zh) / n_var.
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

// 1 / sqrt(mean(x^2) + eps) over one group of cg features.
inline float GroupScale(const float* __restrict xg, int64_t cg, float eps) {
  float q = 0.0f;
#pragma omp simd reduction(+ : q)
  for (int64_t j = 0; j < cg; ++j) q += xg[j] * xg[j];
  return 1.0f / std::sqrt(q / static_cast<float>(cg) + eps);
}

template <bool kCenter>
void StatsImpl(const float* __restrict xp, const float* __restrict wp,
               const float* __restrict kp, int64_t n, int64_t c,
               int64_t groups, float gs_eps, float* __restrict rp,
               float* sqp, float* s1p) {
  const int64_t ng = std::max<int64_t>(groups, 1);
  const int64_t cg = c / ng;
  const int threads = NumThreads(n * c);
  const int k_count = kCenter ? 2 : 1;
  std::vector<float> partial(
      static_cast<size_t>(k_count * threads * Stride(c)), 0.0f);
  float* part = partial.data();
  ParallelRows(n, threads, [=](int t, int64_t lo, int64_t hi) {
    float* __restrict sq = part + k_count * t * Stride(c);
    float* __restrict s1 = sq + Stride(c);
    for (int64_t i = lo; i < hi; ++i) {
      const float* xr = xp + i * c;
      const float wi = wp[i];
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t o = g * cg;
        const float r = groups > 0 ? GroupScale(xr + o, cg, gs_eps) : 1.0f;
        rp[i * ng + g] = r;
        if (wi == 0.0f) continue;  // a pad: a NaN there must not enter sums
        const float* __restrict xg = xr + o;
        float* __restrict qg = sq + o;
        if (kCenter) {
          const float* __restrict kg = kp + o;
          float* __restrict sg = s1 + o;
#pragma omp simd
          for (int64_t j = 0; j < cg; ++j) {
            const float d = xg[j] * r - kg[j];
            sg[j] += wi * d;
            qg[j] += wi * d * d;
          }
        } else {
          const float wr2 = wi * r * r;
#pragma omp simd
          for (int64_t j = 0; j < cg; ++j) qg[j] += wr2 * (xg[j] * xg[j]);
        }
      }
    }
  });
  float* out[2] = {sqp, s1p};
  SumPartials(partial, threads, k_count, c, out);
}

ffi::Error Stats(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> rs,
                 ffi::ResultBuffer<ffi::F32> sq, ffi::ResultBuffer<ffi::F32> s1,
                 int64_t groups, float gs_eps, bool center) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  float* s1p = s1->typed_data();
  if (center) {
    StatsImpl<true>(x.typed_data(), w.typed_data(), shift.typed_data(), n, c,
                    groups, gs_eps, rs->typed_data(), sq->typed_data(), s1p);
  } else {
    StatsImpl<false>(x.typed_data(), w.typed_data(), nullptr, n, c, groups,
                     gs_eps, rs->typed_data(), sq->typed_data(), nullptr);
    std::fill(s1p, s1p + c, 0.0f);
  }
  return ffi::Error::Success();
}

// y = keep_i * (x rs - mu) * inv_d * scale + bias, as keep_i (a A - B) + bias
// with A = inv_d scale and B = mu inv_d scale per column.
ffi::Error Apply(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                 ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> keep,
                 ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> scale,
                 ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  const int64_t ng = LastDim(rs.dimensions());
  const int64_t cg = c / ng;
  std::vector<float> coef(static_cast<size_t>(2 * c));
  for (int64_t j = 0; j < c; ++j) {
    coef[j] = inv_d.typed_data()[j] * scale.typed_data()[j];
    coef[c + j] = mu.typed_data()[j] * coef[j];
  }
  const float* xp = x.typed_data();
  const float* rp = rs.typed_data();
  const float* kp = keep.typed_data();
  const float* ap = coef.data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  ParallelRows(n, NumThreads(n * c), [=](int, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float ki = kp[i];
      if (ki == 0.0f) {  // a dropped row (a pad of the paper's BN): y = bias
        std::copy(bp, bp + c, yp + i * c);  // whatever x holds there
        continue;
      }
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t o = g * cg;
        const float r = rp[i * ng + g];
        const float* __restrict xg = xp + i * c + o;
        const float* __restrict ag = ap + o;
        const float* __restrict mg = ap + c + o;
        const float* __restrict bg = bp + o;
        float* __restrict yg = yp + i * c + o;
#pragma omp simd
        for (int64_t j = 0; j < cg; ++j) {
          yg[j] = ki * ((xg[j] * r) * ag[j] - mg[j]) + bg[j];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// The column operands of the backward passes; unused ones are nullptr.
struct Columns {
  const float* mu;
  const float* inv_d;
  const float* inv_bd;
  const float* scale;
  const float* e;
  const float* corr;
};

// PowerBackward (kDx) or PowerColumns (no correction, no dx); kKeep: keep
// varies per row (else it is 1 and not read) and dk is summed. The options
// are template parameters so that each inner loop is branch-free.
template <bool kDx, bool kGroupScaled, bool kKeep>
void BackwardImpl(const float* __restrict xp, const float* __restrict rp,
                  int64_t ng, const float* __restrict kp, Columns col,
                  const float* __restrict cwp, const float* __restrict gp,
                  int64_t n, int64_t c, float* __restrict dxp,
                  float* const* sums) {
  const int64_t cg = c / ng;
  const int threads = NumThreads(n * c);
  const int k_count = kKeep ? 4 : 3;
  std::vector<float> partial(
      static_cast<size_t>(k_count * threads * Stride(c)), 0.0f);
  float* part = partial.data();
  ParallelRows(n, threads, [=](int t, int64_t lo, int64_t hi) {
    float* __restrict du = part + k_count * t * Stride(c);
    float* __restrict ds = du + Stride(c);
    float* __restrict db = ds + Stride(c);
    float* __restrict dk = db + Stride(c);
    for (int64_t i = lo; i < hi; ++i) {
      const float* __restrict xr = xp + i * c;
      const float* __restrict gr = gp + i * c;
      const float cw = cwp[i];
      const float ki = kKeep ? kp[i] : 1.0f;
      if (kKeep && ki == 0.0f) {  // a dropped row: only dbias sees it
        for (int64_t j = 0; j < c; ++j) db[j] += gr[j];
        if (kDx) std::fill(dxp + i * c, dxp + (i + 1) * c, 0.0f);
        continue;
      }
      for (int64_t g = 0; g < ng; ++g) {
        const float r = rp[i * ng + g];
        const int64_t o = g * cg;  // this group's slice of the row
        const float* __restrict xg = xr + o;
        const float* __restrict gg = gr + o;
        const float* __restrict mg = col.mu + o;
        const float* __restrict dg = col.inv_d + o;
        const float* __restrict sg = col.scale + o;
        const float* __restrict eg = kDx ? col.e + o : nullptr;
        const float* __restrict cg_ = kDx ? col.corr + o : nullptr;
        const float* __restrict bg = kDx ? col.inv_bd + o : nullptr;
        float* __restrict ug = du + o;
        float* __restrict vg = ds + o;
        float* __restrict wg = db + o;
        float* __restrict kg = dk + o;
        float a = 0.0f;  // sum over the group of da * a
#pragma omp simd reduction(+ : a)
        for (int64_t j = 0; j < cg; ++j) {
          const float xs = xg[j] * r;
          const float zh = (xs - mg[j]) * dg[j];
          const float gy = gg[j];
          const float gk = kKeep ? ki * gy : gy;
          const float gh = kDx ? gk * sg[j] - cw * (eg[j] + cg_[j] * zh)
                               : gk * sg[j];
          ug[j] += cw != 0.0f ? cw * gh * zh : 0.0f;  // pads: NaN-proof
          vg[j] += gk * zh;
          wg[j] += gy;
          if (kKeep) kg[j] += gk;
          if (kDx && kGroupScaled) a += gh * bg[j] * xs;
        }
        if (!kDx) continue;
        // da = g_hat * inv_bd, then GroupScaling's VJP; the row is in L1.
        float* __restrict dr = dxp + i * c + o;
        const float m = kGroupScaled ? a / static_cast<float>(cg) : 0.0f;
        const float rr = kGroupScaled ? r : 1.0f;
#pragma omp simd
        for (int64_t j = 0; j < cg; ++j) {
          const float xs = xg[j] * r;
          const float zh = (xs - mg[j]) * dg[j];
          const float gk = kKeep ? ki * gg[j] : gg[j];
          const float gh = gk * sg[j] - cw * (eg[j] + cg_[j] * zh);
          dr[j] = rr * (gh * bg[j] - xs * m);
        }
      }
    }
  });
  SumPartials(partial, threads, k_count, c, sums);
}

template <bool kDx>
void Dispatch(bool group_scaled, bool per_row_keep, const float* xp,
              const float* rp, int64_t ng, const float* kp, Columns col,
              const float* cwp, const float* gp, int64_t n, int64_t c,
              float* dxp, float* const* sums) {
  auto impl = group_scaled
      ? (per_row_keep ? BackwardImpl<kDx, true, true>
                      : BackwardImpl<kDx, true, false>)
      : (per_row_keep ? BackwardImpl<kDx, false, true>
                      : BackwardImpl<kDx, false, false>);
  impl(xp, rp, ng, kp, col, cwp, gp, n, c, dxp, sums);
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                    ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> keep,
                    ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> inv_bd,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> e,
                    ffi::Buffer<ffi::F32> corr, ffi::Buffer<ffi::F32> cw,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> du,
                    ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias,
                    ffi::ResultBuffer<ffi::F32> dkeep, bool group_scaled,
                    bool per_row_keep) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  Columns col{mu.typed_data(),    inv_d.typed_data(), inv_bd.typed_data(),
              scale.typed_data(), e.typed_data(),     corr.typed_data()};
  float* sums[4] = {du->typed_data(), dscale->typed_data(),
                    dbias->typed_data(), dkeep->typed_data()};
  if (!per_row_keep) std::fill(sums[3], sums[3] + c, 0.0f);
  Dispatch<true>(group_scaled, per_row_keep, x.typed_data(), rs.typed_data(),
                 LastDim(rs.dimensions()), keep.typed_data(), col,
                 cw.typed_data(), dy.typed_data(), n, c, dx->typed_data(),
                 sums);
  return ffi::Error::Success();
}

ffi::Error ColumnSums(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                      ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> keep,
                      ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> cw, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> du,
                      ffi::ResultBuffer<ffi::F32> dscale,
                      ffi::ResultBuffer<ffi::F32> dbias,
                      ffi::ResultBuffer<ffi::F32> dkeep, bool per_row_keep) {
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  Columns col{mu.typed_data(), inv_d.typed_data(), nullptr,
              scale.typed_data(), nullptr, nullptr};
  float* sums[4] = {du->typed_data(), dscale->typed_data(),
                    dbias->typed_data(), dkeep->typed_data()};
  if (!per_row_keep) std::fill(sums[3], sums[3] + c, 0.0f);
  Dispatch<false>(false, per_row_keep, x.typed_data(), rs.typed_data(),
                  LastDim(rs.dimensions()), keep.typed_data(), col,
                  cw.typed_data(), dy.typed_data(), n, c, nullptr, sums);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerStats, Stats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s1
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("gs_eps")
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerApply, Apply,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_bd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // e
                                  .Arg<ffi::Buffer<ffi::F32>>()  // corr
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cw
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkeep
                                  .Attr<bool>("group_scaled")
                                  .Attr<bool>("per_row_keep"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerColumns, ColumnSums,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cw
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkeep
                                  .Attr<bool>("per_row_keep"));

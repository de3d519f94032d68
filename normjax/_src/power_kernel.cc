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
//                its precision: given, or found here; s1 only when centred)
//                                                              (pass 1 of 2)
// PowerApply:    y = z * scale + bias                         (pass 2 of 2)
// PowerForward:  PowerNorm's forward: PowerStats then PowerApply in its
//                warmup; after it, rs, sq and y in one pass (inv_d comes
//                from phi_{t-1})
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
#include <vector>

#include "kernel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using normjax::LastDim;
using normjax::LineBuffer;
using normjax::NumThreads;
using normjax::ParallelRows;
using normjax::StreamOutput;
using normjax::WriteRow;

// Per-thread column partial sums lie Stride(c) floats apart: not a multiple
// of 4 KiB, so that their stores do not alias (in the low 12 address bits)
// the row loads and stores of the same j, which costs about 2x in the
// backward pass.
int64_t Stride(int64_t c) { return c + 48; }

// out[k][j] = sum over threads of part[(t * k_count + k) * Stride(c) + j].
void SumPartials(const LineBuffer& part, int threads, int k_count,
                 int64_t c, float* const* out) {
  const int64_t stride = Stride(c);
  for (int k = 0; k < k_count; ++k) {
    if (out[k] == nullptr) continue;
    for (int64_t j = 0; j < c; ++j) {
      float s = 0.0f;
      for (int t = 0; t < threads; ++t) {
        s += part.data()[(t * k_count + k) * stride + j];
      }
      out[k][j] = s;
    }
  }
}

// Block rows: the column sums are accumulated over kBlock rows at a time,
// so that each column operand and partial sum is loaded and stored once per
// block rather than once per row. Two rows, not four: rows of 1024 floats
// are 4 KiB apart, so the rows of a block share L1 sets (8 ways), and four
// rows of x and dy with the column vectors evicted each other. Outputs are
// written one row at a time: storing row q while loading row q + 1 at the
// same column aliases in the low 12 address bits (a stall on every load).
// Passes without column sums (dx only) take one row at a time.
//
// Blocks pay while the rows come from cache; streamed from memory, the two
// rows of a block double the concurrent streams, and one row at a time is
// faster. Measured on the 2-core VM (32 MiB L3; a C++ harness timing both
// forms of this file in the same rounds, [rows, 1024] f32, the L3 evicted
// before each call for 4096 rows): the centred statistics pass, 4096 rows:
// one row at a time 0.61 ms, blocks 0.77 ms; 512 rows in cache: 0.065 vs
// 0.049 ms. PowerNorm's backward, 4096 rows: one row 8-12% faster; 128 to
// 1024 rows in cache: blocks 8-15% faster. So rows are blocked while x is
// at most kBlockedBytes (a fixed size, so that the summation order, and
// with it every bit of the result, does not depend on the machine). Above
// it the column-sum passes take one row at a time and the statistics pass
// tiles (kTileRows). PowerNorm's pass (dx and the sums) is the exception:
// since dx is written with streaming stores (kernel_rows.h), blocks made
// its training step (benchmarks/norms.py, 4096 rows, in-process A/B) 1-7%
// faster, while they made those of BatchNorm, the paper's BN and UN, whose
// sums come from a pass without dx, 2-7% slower; so it takes blocks at
// every size.
constexpr int kBlock = 2;
constexpr int64_t kBlockedBytes = int64_t{8} << 20;

inline bool Blocked(int64_t n, int64_t c) {
  return n * c * static_cast<int64_t>(sizeof(float)) <= kBlockedBytes;
}

// 1 / sqrt(mean(x^2) + eps) over one group of cg features.
inline float GroupScale(const float* __restrict xg, int64_t cg, float eps) {
  float q = 0.0f;
#pragma omp simd reduction(+ : q)
  for (int64_t j = 0; j < cg; ++j) q += xg[j] * xg[j];
  return 1.0f / std::sqrt(q / static_cast<float>(cg) + eps);
}

// Adds group g of the R rows from i0 (all with w > 0) to the column sums:
// sq += w (a - k)^2 and, centred, s1 += w (a - k) (uncentred: k = 0).
template <bool kCenter, int R>
inline void StatsRows(const float* __restrict x, const float* w,
                      const float* r, const float* __restrict k, int64_t c,
                      int64_t cg, float* __restrict sq,
                      float* __restrict s1) {
  static_assert(R == 1 || R == 2);
#pragma omp simd
  for (int64_t j = 0; j < cg; ++j) {
    const float kj = kCenter ? k[j] : 0.0f;
    float q = 0.0f, m = 0.0f;
    auto row = [&](int i) __attribute__((always_inline)) {
      const float d = x[i * c + j] * r[i] - kj;
      q += w[i] * d * d;
      if (kCenter) m += w[i] * d;
    };
    row(0);
    if constexpr (R == 2) row(1);
    sq[j] += q;
    if (kCenter) s1[j] += m;
  }
}

// Streamed from memory (x over kBlockedBytes), the statistics pass works on
// tiles of kTileRows rows by kTileCols columns: a tile's column sums stay
// in registers while its rows are added, so that per element only x (and
// the shift k, from L1) is loaded, where one row at a time loads and stores
// both sums per element. Measured on the 2-core VM (a C++ harness timing
// this file before and after in the same rounds, [rows, 1024] f32 with
// every 7th row a pad, the L3 evicted before each call), tiles / one row:
// 4096 rows centred 0.75-0.78, uncentred 0.88, with GroupScaling (4) 0.78,
// 1000 features 0.78, 8192 rows 0.74. Tile shapes tried at 4096 and 2048
// rows: 8 x 32 0.71-0.82, 8 x 64 0.75-0.82, 16 x 64 0.72-0.84, 32-row tiles
// 0.96-1.20. In cache (512 rows) the blocks of two stayed faster than tiles
// (64 columns 2-4%, 32 columns 15-18%, 16 columns 29-30%), so they keep
// that range. The backward's column sums stay one row at a time: the same
// tiles there (every pass with sums, 4096 rows) took 1.06-1.38x as long as
// one row, 4 x 32 tiles 0.92-1.13x, 16 x 16 1.64-2.16x; a tile there reads
// two rows (x and dy) per row, 4 KiB apart in the same L1 sets. So does the
// one-pass forward's psi2 sum: tiles writing y took 1.42-1.56x as long.
constexpr int kTileRows = 8, kTileCols = 64;

// Adds rows [i0, i1) (those with w > 0) of the kWidth columns from j to the
// column sums: sq += w (a - k)^2 and, centred, s1 += w (a - k) (uncentred:
// k = 0), with a = x * r (r: the rs of this group, ng floats per row).
template <bool kCenter, int kWidth>
inline void StatsTile(const float* __restrict x, const float* w,
                      const float* r, int64_t ng, int64_t c, int64_t i0,
                      int64_t i1, int64_t j, const float* __restrict k,
                      float* __restrict sq, float* __restrict s1) {
  float q[kWidth], m[kWidth];
#pragma omp simd
  for (int u = 0; u < kWidth; ++u) {
    q[u] = 0.0f;
    m[u] = 0.0f;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const float wi = w[i];
    if (wi == 0.0f) continue;  // a pad: a NaN there must not enter the sums
    const float ri = r[i * ng];
    const float* __restrict xr = x + i * c + j;
#pragma omp simd
    for (int u = 0; u < kWidth; ++u) {
      const float d = xr[u] * ri - (kCenter ? k[j + u] : 0.0f);
      q[u] += wi * d * d;
      m[u] += wi * d;
    }
  }
#pragma omp simd
  for (int u = 0; u < kWidth; ++u) {
    sq[j + u] += q[u];
    if (kCenter) s1[j + u] += m[u];
  }
}

// StatsTile over the columns [j0, j1): whole tiles, then 8 and 1 wide.
template <bool kCenter>
void StatsTiles(const float* x, const float* w, const float* r, int64_t ng,
                int64_t c, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                const float* k, float* sq, float* s1) {
  int64_t j = j0;
  for (; j + kTileCols <= j1; j += kTileCols) {
    StatsTile<kCenter, kTileCols>(x, w, r, ng, c, i0, i1, j, k, sq, s1);
  }
  for (; j + 8 <= j1; j += 8) {
    StatsTile<kCenter, 8>(x, w, r, ng, c, i0, i1, j, k, sq, s1);
  }
  for (; j < j1; ++j) StatsTile<kCenter, 1>(x, w, r, ng, c, i0, i1, j, k, sq, s1);
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
  const bool blocked = Blocked(n, c);
  LineBuffer partial(k_count * threads * Stride(c));
  float* part = partial.data();
  ParallelRows(n, threads, [=](int t, int64_t lo, int64_t hi) {
    float* sq = part + k_count * t * Stride(c);
    float* s1 = sq + Stride(c);
    auto scales = [&](int64_t i, float* r) {  // rs of row i, one per group
      for (int64_t g = 0; g < ng; ++g) {
        r[g] = groups > 0 ? GroupScale(xp + i * c + g * cg, cg, gs_eps) : 1.0f;
      }
    };
    auto one_row = [&](int64_t i) {  // row i, its rs already in rp
      if (wp[i] == 0.0f) return;  // a pad: a NaN there must not enter the sums
      for (int64_t g = 0; g < ng; ++g) {
        StatsRows<kCenter, 1>(xp + i * c + g * cg, wp + i, rp + i * ng + g,
                              kp + g * cg, c, cg, sq + g * cg, s1 + g * cg);
      }
    };
    if (!blocked) {  // streamed from memory: tiles
      for (int64_t i = lo; i < hi; i += kTileRows) {
        const int64_t i1 = std::min<int64_t>(i + kTileRows, hi);
        for (int64_t q = i; q < i1; ++q) scales(q, rp + q * ng);
        for (int64_t g = 0; g < ng; ++g) {
          StatsTiles<kCenter>(xp, wp, rp + g, ng, c, i, i1, g * cg,
                              (g + 1) * cg, kp, sq, s1);
        }
      }
      return;
    }
    int64_t i = lo;
    for (; i + kBlock <= hi; i += kBlock) {
      bool whole = true;
      for (int q = 0; q < kBlock; ++q) whole &= wp[i + q] != 0.0f;
      for (int q = 0; q < kBlock; ++q) scales(i + q, rp + (i + q) * ng);
      if (!whole) {
        for (int q = 0; q < kBlock; ++q) one_row(i + q);
        continue;
      }
      for (int64_t g = 0; g < ng; ++g) {
        float r[kBlock];
        for (int q = 0; q < kBlock; ++q) r[q] = rp[(i + q) * ng + g];
        StatsRows<kCenter, kBlock>(xp + i * c + g * cg, wp + i, r,
                                   kp + g * cg, c, cg, sq + g * cg,
                                   s1 + g * cg);
      }
    }
    if (i < hi) {  // an odd last row
      scales(i, rp + i * ng);
      one_row(i);
    }
  });
  float* out[2] = {sqp, s1p};
  SumPartials(partial, threads, k_count, c, out);
}

// k [C] = a at the first row with w > 0 (0 without one): the shift of the
// centred sums, found here so that the caller needs no pass of its own.
void FirstRealRow(const float* xp, const float* wp, int64_t n, int64_t c,
                  int64_t groups, float gs_eps, float* k) {
  const int64_t i = std::find_if(wp, wp + n, [](float v) { return v != 0.0f; })
                    - wp;
  if (i == n) {
    std::fill(k, k + c, 0.0f);
    return;
  }
  const int64_t ng = std::max<int64_t>(groups, 1), cg = c / ng;
  for (int64_t g = 0; g < ng; ++g) {
    const float* xg = xp + i * c + g * cg;
    const float r = groups > 0 ? GroupScale(xg, cg, gs_eps) : 1.0f;
    for (int64_t j = 0; j < cg; ++j) k[g * cg + j] = xg[j] * r;
  }
}

ffi::Error Stats(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> rs,
                 ffi::ResultBuffer<ffi::F32> sq, ffi::ResultBuffer<ffi::F32> s1,
                 ffi::ResultBuffer<ffi::F32> shift_used, int64_t groups,
                 float gs_eps, bool center, bool find_shift,
                 ffi::ThreadPool xla_pool) {
  normjax::UseXlaPool use_xla_pool(xla_pool);
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  float* s1p = s1->typed_data();
  float* k = shift_used->typed_data();
  if (center && find_shift) {
    FirstRealRow(x.typed_data(), w.typed_data(), n, c, groups, gs_eps, k);
  } else {
    std::copy(shift.typed_data(), shift.typed_data() + c, k);
  }
  if (center) {
    StatsImpl<true>(x.typed_data(), w.typed_data(), k, n, c, groups, gs_eps,
                    rs->typed_data(), sq->typed_data(), s1p);
  } else {
    StatsImpl<false>(x.typed_data(), w.typed_data(), nullptr, n, c, groups,
                     gs_eps, rs->typed_data(), sq->typed_data(), nullptr);
    std::fill(s1p, s1p + c, 0.0f);
  }
  return ffi::Error::Success();
}

// PowerNorm after its warmup: the denominator is known before the pass, so
// y = x rs inv_d scale + bias and the statistic sq = sum_i w_i (x rs)^2 come
// from one pass over x (rows with w = 0 stay out of sq).
void StatsApplyRows(const float* xp, const float* wp, const float* inv_d,
                    const float* scale, const float* bp, int64_t n, int64_t c,
                    int64_t groups, float gs_eps, float* rp, float* sqp,
                    float* yp) {
  const int64_t ng = std::max<int64_t>(groups, 1), cg = c / ng;
  std::vector<float> coef(static_cast<size_t>(c));
  for (int64_t j = 0; j < c; ++j) coef[j] = inv_d[j] * scale[j];
  const float* ap = coef.data();
  const int threads = NumThreads(n * c);
  const bool stream = StreamOutput(n * c * sizeof(float));
  LineBuffer partial(threads * Stride(c));
  float* part = partial.data();
  ParallelRows(n, threads, [=](int t, int64_t lo, int64_t hi) {
    float* acc = part + t * Stride(c);
    for (int64_t i = lo; i < hi; ++i) {
      const float wi = wp[i];
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t o = g * cg;
        const float* __restrict xg = xp + i * c + o;
        const float r = groups > 0 ? GroupScale(xg, cg, gs_eps) : 1.0f;
        rp[i * ng + g] = r;
        const float* __restrict ag = ap + o;
        const float* __restrict bg = bp + o;
        float* __restrict yg = yp + i * c + o;
        float* __restrict qg = acc + o;
        if (wi == 0.0f) {  // a pad: normalised, kept out of sq
          WriteRow(yg, cg, stream,
                   [&](int64_t j) { return xg[j] * r * ag[j] + bg[j]; });
          continue;
        }
        WriteRow(yg, cg, stream, [&](int64_t j) {
          const float xs = xg[j] * r;
          qg[j] += wi * xs * xs;
          return xs * ag[j] + bg[j];
        });
      }
    }
  });
  float* out[1] = {sqp};
  SumPartials(partial, threads, 1, c, out);
}

// y = keep_i * (x rs - mu) * inv_d * scale + bias, as keep_i (a A - B) + bias
// with A = inv_d scale and B = mu inv_d scale per column.
void ApplyRows(const float* xp, const float* rp, int64_t ng, const float* mu,
               const float* kp, const float* inv_d, const float* scale,
               const float* bp, int64_t n, int64_t c, float* yp) {
  const int64_t cg = c / ng;
  std::vector<float> coef(static_cast<size_t>(2 * c));
  for (int64_t j = 0; j < c; ++j) {
    coef[j] = inv_d[j] * scale[j];
    coef[c + j] = (mu ? mu[j] : 0.0f) * coef[j];
  }
  const float* ap = coef.data();
  const bool stream = StreamOutput(n * c * sizeof(float));
  ParallelRows(n, NumThreads(n * c), [=](int, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float ki = kp ? kp[i] : 1.0f;
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
        WriteRow(yp + i * c + o, cg, stream, [&](int64_t j) {
          return ki * ((xg[j] * r) * ag[j] - mg[j]) + bg[j];
        });
      }
    }
  });
}

ffi::Error Apply(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                 ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> keep,
                 ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> scale,
                 ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                 ffi::ThreadPool xla_pool) {
  normjax::UseXlaPool use_xla_pool(xla_pool);
  const int64_t c = LastDim(x.dimensions());
  ApplyRows(x.typed_data(), rs.typed_data(), LastDim(rs.dimensions()),
            mu.typed_data(), keep.typed_data(), inv_d.typed_data(),
            scale.typed_data(), bias.typed_data(), x.element_count() / c, c,
            y->typed_data());
  return ffi::Error::Success();
}

// PowerNorm's training forward: rs, sq, y and the inv_d used. In the
// warmup (warm[0] != 0) two passes, the statistics then y with
// inv_d = 1 / sqrt(psi2 + eps), psi2 = sq / count (phi_{t-1} without real
// rows); after it one pass with inv_d = 1 / sqrt(phi_{t-1} + eps), psi2's
// sum taken while y is written. One device only: on row shards the
// statistics need a psum first (power_kernel.py does it in two calls).
ffi::Error PowerForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> phi, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> warm,
                        ffi::ResultBuffer<ffi::F32> rs,
                        ffi::ResultBuffer<ffi::F32> sq,
                        ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::F32> inv_d, int64_t groups,
                        float gs_eps, float eps,
                        ffi::ThreadPool xla_pool) {
  normjax::UseXlaPool use_xla_pool(xla_pool);
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  const float* pp = phi.typed_data();
  float* inv = inv_d->typed_data();
  if (warm.typed_data()[0] != 0.0f) {
    StatsImpl<false>(x.typed_data(), w.typed_data(), nullptr, n, c, groups,
                     gs_eps, rs->typed_data(), sq->typed_data(), nullptr);
    float count = 0.0f;
    for (int64_t i = 0; i < n; ++i) count += w.typed_data()[i];
    const float* sp = sq->typed_data();
    for (int64_t j = 0; j < c; ++j) {
      const float psi2 = count > 0.0f ? sp[j] / std::max(count, 1.0f) : pp[j];
      inv[j] = 1.0f / std::sqrt(psi2 + eps);
    }
    ApplyRows(x.typed_data(), rs->typed_data(), std::max<int64_t>(groups, 1),
              nullptr, nullptr, inv, scale.typed_data(), bias.typed_data(), n,
              c, y->typed_data());
  } else {
    for (int64_t j = 0; j < c; ++j) inv[j] = 1.0f / std::sqrt(pp[j] + eps);
    StatsApplyRows(x.typed_data(), w.typed_data(), inv, scale.typed_data(),
                   bias.typed_data(), n, c, groups, gs_eps, rs->typed_data(),
                   sq->typed_data(), y->typed_data());
  }
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

// What a backward pass does, as bits of a template parameter so that each
// inner loop is branch-free: kDx writes dx (with the correction), kSums
// accumulates dscale, dbias (and dk with kKeep), kDu also du; kGroupScaled
// applies GroupScaling's VJP; kKeep reads a per-row keep (else 1); kCenter
// reads mu and e (else 0).
enum Flag { kDx = 1, kSums = 2, kDu = 4, kGroupScaled = 8, kKeep = 16,
            kCenter = 32 };

// The pointers one backward pass works with, for one thread.
struct BackwardArgs {
  const float* x;
  const float* rs;
  int64_t ng;
  const float* keep;
  Columns col;
  const float* cw;
  const float* dy;
  int64_t c;
  float* dx;
  float* du;  // this thread's partial sums
  float* ds;
  float* db;
  float* dk;
  float* da;  // [kBlock, c / ng + 16]: g_hat * inv_bd of a block's group
  const float* coef;  // [4, c] with dx: A, E, Z, M (DxCoefficients)
  bool stream;  // dx with streaming stores (WriteRow)
};

// da = g_hat inv_bd = keep dy A + cw (E + Z u), u = x rs - mu, from four
// column vectors computed once per call: A = scale inv_bd, E = -e inv_bd,
// Z = -corr inv_d inv_bd, M = mu (two column loads per element, four when
// centred, where scale, corr inv_d and inv_bd took three, five with e, mu).
void DxCoefficients(const Columns& k, bool center, int64_t c, float* coef) {
  for (int64_t j = 0; j < c; ++j) {
    coef[j] = k.scale[j] * k.inv_bd[j];
    coef[c + j] = center ? -k.e[j] * k.inv_bd[j] : 0.0f;
    coef[2 * c + j] = -k.corr[j] * k.inv_d[j] * k.inv_bd[j];
    coef[3 * c + j] = center ? k.mu[j] : 0.0f;
  }
}

// Group g of the R rows from i0 (none dropped; with kDu, none with cw = 0:
// a pad adds nothing to du, even where its x is NaN). The column sums are
// taken in u = x rs - mu (zh = u inv_d): dscale = sum keep dy u, and du =
// sum cw g_hat u, taken with dx as sum cw da u (da = g_hat inv_bd, see
// DxCoefficients); BackwardImpl multiplies them by inv_d (and du by
// 1 / inv_bd) once at the end.
template <int F, int R>
inline void BackwardRows(const BackwardArgs& p, int64_t i0, int64_t g) {
  static_assert(R == 1 || R == 2);
  constexpr bool dx_ = F & kDx, sums_ = F & kSums, du_ = F & kDu;
  constexpr bool gs_ = F & kGroupScaled, keep_ = F & kKeep;
  constexpr bool center_ = F & kCenter;
  const int64_t cg = p.c / p.ng, o = g * cg;
  const int64_t c = p.c;
  float r[R], cw[R], ki[R];
  for (int q = 0; q < R; ++q) {
    const int64_t i = i0 + q;
    r[q] = p.rs[i * p.ng + g];
    cw[q] = p.cw[i];
    ki[q] = keep_ ? p.keep[i] : 1.0f;
  }
  // Row q of the block at x[q * c + j] (and dy, dx alike).
  const float* __restrict x = p.x + i0 * c + o;
  const float* __restrict dy = p.dy + i0 * c + o;
  float* __restrict dx = dx_ ? p.dx + i0 * c + o : nullptr;
  const float* __restrict mg = p.col.mu + o;
  const float* __restrict sg = p.col.scale + o;
  const float* __restrict ag = dx_ ? p.coef + o : nullptr;
  const float* __restrict eg = dx_ ? p.coef + c + o : nullptr;
  const float* __restrict zg = dx_ ? p.coef + 2 * c + o : nullptr;
  // da goes through a row buffer (ld apart: not a multiple of 4 KiB) when
  // a later loop needs it or rows are blocked.
  constexpr bool buffered = gs_ || R > 1;
  const int64_t ld = cg + 16;
  float* __restrict da = p.da;
  float* __restrict du = p.du + o;
  float* __restrict ds = p.ds + o;
  float* __restrict db = p.db + o;
  float* __restrict dk = p.dk + o;
  float a0 = 0.0f, a1 = 0.0f;  // sum_j da x rs per row
#pragma omp simd reduction(+ : a0, a1)
  for (int64_t j = 0; j < cg; ++j) {
    float su = 0.0f, ss = 0.0f, sb = 0.0f, sk = 0.0f;
    // Row q of the block; inlined, so that the j loop vectorises.
    auto row = [&](int q, float& aq) __attribute__((always_inline)) {
      const float xs = x[q * c + j] * r[q];
      const float u = center_ ? xs - mg[j] : xs;
      const float gy = dy[q * c + j];
      const float gk = keep_ ? ki[q] * gy : gy;
      ss += gk * u;
      sb += gy;
      sk += gk;
      if (!dx_) {
        if (du_) su += cw[q] * (gk * sg[j] * u);
        return;
      }
      const float off = center_ ? eg[j] + zg[j] * u : zg[j] * u;
      const float d = gk * ag[j] + cw[q] * off;
      if (du_) su += cw[q] * (d * u);
      if (buffered) {
        da[q * ld + j] = d;
        if (gs_) aq += d * xs;
      } else {
        dx[q * c + j] = d;
      }
    };
    row(0, a0);
    if constexpr (R == 2) row(1, a1);
    if (du_) du[j] += su;
    if (sums_) {
      ds[j] += ss;
      db[j] += sb;
      if (keep_) dk[j] += sk;
    }
  }
  if (!(dx_ && buffered)) return;
  // dx row by row (see kBlock), with GroupScaling's VJP:
  // dx = rs (da - (x rs) mean_g(da x rs)).
  const float a[2] = {a0, a1};
  for (int q = 0; q < R; ++q) {
    const float b = r[q] * r[q] * a[q] / static_cast<float>(cg), rq = r[q];
    const float* __restrict xq = x + q * c;
    const float* __restrict dq = da + q * ld;
    WriteRow(dx + q * c, cg, p.stream, [&](int64_t j) {
      return gs_ ? rq * dq[j] - xq[j] * b : dq[j];
    });
  }
}

// dx of row i in a pass without column sums, from the four column vectors
// of DxCoefficients (six would not stay in L1 beside the rows):
// da = keep dy A + cw (E + Z (x rs - M)); then GroupScaling's VJP.
template <int F>
void DxOnlyRow(const BackwardArgs& p, int64_t i, const float* coef) {
  constexpr bool gs_ = F & kGroupScaled, keep_ = F & kKeep;
  const int64_t c = p.c, ng = p.ng, cg = c / ng;
  const float cw = p.cw[i], ki = keep_ ? p.keep[i] : 1.0f;
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t o = g * cg;
    const float r = p.rs[i * ng + g];
    const float* __restrict x = p.x + i * c + o;
    const float* __restrict dy = p.dy + i * c + o;
    const float* __restrict ag = coef + o;
    const float* __restrict eg = coef + c + o;
    const float* __restrict zg = coef + 2 * c + o;
    const float* __restrict mg = coef + 3 * c + o;
    float* __restrict dx = p.dx + i * c + o;
    if (!gs_) {
      WriteRow(dx, cg, p.stream, [&](int64_t j) {
        return ki * dy[j] * ag[j] + cw * (eg[j] + zg[j] * (x[j] * r - mg[j]));
      });
      continue;
    }
    float* __restrict da = p.da;
    float a = 0.0f;
#pragma omp simd reduction(+ : a)
    for (int64_t j = 0; j < cg; ++j) {
      const float xs = x[j] * r;
      const float d = ki * dy[j] * ag[j] + cw * (eg[j] + zg[j] * (xs - mg[j]));
      da[j] = d;
      a += d * xs;
    }
    const float b = r * r * a / static_cast<float>(cg);
    WriteRow(dx, cg, p.stream,
             [&](int64_t j) { return r * da[j] - x[j] * b; });
  }
}

// Row i alone: a dropped row (keep 0) adds to dbias only and gets dx = 0.
template <int F>
void BackwardRow(const BackwardArgs& p, int64_t i) {
  if ((F & kKeep) && p.keep[i] == 0.0f) {
    const float* gr = p.dy + i * p.c;
    if (F & kSums) for (int64_t j = 0; j < p.c; ++j) p.db[j] += gr[j];
    if (F & kDx) std::fill(p.dx + i * p.c, p.dx + (i + 1) * p.c, 0.0f);
    return;
  }
  if constexpr ((F & kDx) && !(F & kSums)) {
    DxOnlyRow<F>(p, i, p.coef);
  } else if ((F & kDu) && p.cw[i] == 0.0f) {  // a pad: nothing to du
    for (int64_t g = 0; g < p.ng; ++g) BackwardRows<F & ~kDu, 1>(p, i, g);
  } else {
    for (int64_t g = 0; g < p.ng; ++g) BackwardRows<F, 1>(p, i, g);
  }
}

template <int F>
void BackwardImpl(BackwardArgs args, int64_t n, float* const* sums) {
  constexpr bool sums_ = F & kSums;
  const int64_t c = args.c;
  const int threads = NumThreads(n * c);
  const int k_count = 4;
  // PowerNorm's pass (dx and sums) takes blocks at every size; see kBlock.
  const bool blocked = Blocked(n, c) || (F & kDx);
  LineBuffer partial(sums_ ? k_count * threads * Stride(c) : 0);
  float* part = partial.data();
  std::vector<float> coef((F & kDx) ? 4 * c : 0);
  if (F & kDx) DxCoefficients(args.col, F & kCenter, c, coef.data());
  const float* coef_p = coef.data();
  const bool stream = StreamOutput(n * c * sizeof(float));
  ParallelRows(n, threads, [=](int t, int64_t lo, int64_t hi) {
    BackwardArgs p = args;
    p.coef = coef_p;
    p.stream = stream;
    if (sums_) {
      p.du = part + k_count * t * Stride(c);
      p.ds = p.du + Stride(c);
      p.db = p.ds + Stride(c);
      p.dk = p.db + Stride(c);
    }
    LineBuffer buffer(kBlock * (c / p.ng + 16));
    p.da = buffer.data();
    int64_t i = lo;
    for (; sums_ && blocked && i + kBlock <= hi; i += kBlock) {
      bool whole = true;
      for (int q = 0; q < kBlock; ++q) {
        if (F & kKeep) whole &= p.keep[i + q] != 0.0f;
        if (F & kDu) whole &= p.cw[i + q] != 0.0f;
      }
      if (!whole) {
        for (int q = 0; q < kBlock; ++q) BackwardRow<F>(p, i + q);
        continue;
      }
      for (int64_t g = 0; g < p.ng; ++g) BackwardRows<F, kBlock>(p, i, g);
    }
    for (; i < hi; ++i) BackwardRow<F>(p, i);
  });
  if (!sums_) return;
  SumPartials(partial, threads, k_count, c, sums);
  for (int k = 0; k < 2; ++k) {  // du and dscale: from u-space to zh-space
    if (sums[k] == nullptr) continue;
    for (int64_t j = 0; j < c; ++j) sums[k][j] *= args.col.inv_d[j];
  }
  if ((F & kDx) && sums[0] != nullptr) {  // du from da = g_hat inv_bd
    for (int64_t j = 0; j < c; ++j) sums[0][j] /= args.col.inv_bd[j];
  }
}

// The combinations the callers use (power_kernel.py, batch_kernel.py,
// unified_norm.py); no other is compiled, and asking for one is an error.
constexpr int kUsed[] = {
    kDx | kSums | kDu | kGroupScaled, kDx | kSums | kDu,  // PowerNorm
    kSums | kDu, kDx,                                      // UN; PN-V's dx
    kSums, kDx | kGroupScaled,                             // PN-V
    kSums | kCenter, kDx | kCenter,                        // BatchNorm
    kSums | kCenter | kKeep, kDx | kGroupScaled | kCenter | kKeep,
    kDx | kGroupScaled | kCenter,                          // the paper's BN
};

constexpr bool Valid(int f) {
  for (int used : kUsed) {
    if (f == used) return true;
  }
  return false;
}

// Runs BackwardImpl<flags>: the runtime flags mapped onto the instantiation;
// false for a combination that is not compiled.
template <int F = 0>
bool DispatchFlags(int flags, const BackwardArgs& args, int64_t n,
                   float* const* sums) {
  if constexpr (F < 64) {
    if constexpr (Valid(F)) {
      if (flags == F) {
        BackwardImpl<F>(args, n, sums);
        return true;
      }
    }
    return DispatchFlags<F + 1>(flags, args, n, sums);
  }
  return false;
}

ffi::Error Unsupported() {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "normjax: this combination of backward options is not "
                    "compiled (power_kernel.cc, Valid)");
}

int Flags(bool dx, bool sums, bool du, bool group_scaled, bool keep,
          bool center) {
  return (dx ? kDx : 0) | (sums ? kSums : 0) | (du ? kDu | kSums : 0) |
         (group_scaled ? kGroupScaled : 0) | (keep ? kKeep : 0) |
         (center ? kCenter : 0);
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
                    bool per_row_keep, bool center, bool sums,
                    ffi::ThreadPool xla_pool) {
  normjax::UseXlaPool use_xla_pool(xla_pool);
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  Columns col{mu.typed_data(),    inv_d.typed_data(), inv_bd.typed_data(),
              scale.typed_data(), e.typed_data(),     corr.typed_data()};
  float* out[4] = {du->typed_data(), dscale->typed_data(),
                   dbias->typed_data(), dkeep->typed_data()};
  for (int k = 0; k < 4; ++k) std::fill(out[k], out[k] + c, 0.0f);
  BackwardArgs args{x.typed_data(), rs.typed_data(), LastDim(rs.dimensions()),
                    keep.typed_data(), col, cw.typed_data(), dy.typed_data(),
                    c, dx->typed_data()};
  const bool done = DispatchFlags(
      Flags(true, sums, sums, group_scaled, per_row_keep, center), args, n,
      out);
  return done ? ffi::Error::Success() : Unsupported();
}

ffi::Error ColumnSums(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rs,
                      ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> keep,
                      ffi::Buffer<ffi::F32> inv_d, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> cw, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> du,
                      ffi::ResultBuffer<ffi::F32> dscale,
                      ffi::ResultBuffer<ffi::F32> dbias,
                      ffi::ResultBuffer<ffi::F32> dkeep, bool per_row_keep,
                      bool center, bool with_du,
                      ffi::ThreadPool xla_pool) {
  normjax::UseXlaPool use_xla_pool(xla_pool);
  const int64_t c = LastDim(x.dimensions());
  const int64_t n = x.element_count() / c;
  Columns col{mu.typed_data(), inv_d.typed_data(), nullptr,
              scale.typed_data(), nullptr, nullptr};
  float* out[4] = {du->typed_data(), dscale->typed_data(),
                   dbias->typed_data(), dkeep->typed_data()};
  for (int k = 0; k < 4; ++k) std::fill(out[k], out[k] + c, 0.0f);
  BackwardArgs args{x.typed_data(), rs.typed_data(), LastDim(rs.dimensions()),
                    keep.typed_data(), col, cw.typed_data(), dy.typed_data(),
                    c, nullptr};
  const bool done = DispatchFlags(
      Flags(false, true, with_du, false, per_row_keep, center), args, n, out);
  return done ? ffi::Error::Success() : Unsupported();
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
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k used
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("gs_eps")
                                  .Attr<bool>("center")
                                  .Attr<bool>("find_shift")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerForward, PowerForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // phi_{t-1}
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // warm [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("gs_eps")
                                  .Attr<float>("eps")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxPowerApply, Apply,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ctx<ffi::ThreadPool>());

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
                                  .Attr<bool>("per_row_keep")
                                  .Attr<bool>("center")
                                  .Attr<bool>("sums")
                                  .Ctx<ffi::ThreadPool>());

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
                                  .Attr<bool>("per_row_keep")
                                  .Attr<bool>("center")
                                  .Attr<bool>("with_du")
                                  .Ctx<ffi::ThreadPool>());

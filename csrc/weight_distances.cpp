// CPU kernel of pmkernels.weight_distances: one pass over each delta D_k.
//
// For every k it reads each element of D_k (out, in) exactly once and produces
//   sq[k]    = ||D_k||_F^2                      (K,)
//   Y[:, k]  = D_k V        (out, r)            Y (out, K, r)
//   Z[:, k]  = D_k^T U      (in, r)             Z (in, K, r)
// from which the host gets P_k = U^T D_k V = U^T Y_k and the gradients
//   dU = sum_k Y_k dP_k^T,  dV = sum_k Z_k dP_k   (see weight_distances.py).
//
// Work split: rows of D_k in blocks, grouped into a fixed number of row chunks
// (a function of the shape only, see chunk_plan) spread over OpenMP threads;
// each chunk keeps its own partial of D_k^T U and ||D_k||^2, summed in chunk
// order at the end of each k: results are bit-identical for any thread count. Inner loops run
// over a chunk of columns held in L1, vectorised with `omp simd` over columns:
// per column, 4 FMAs into the Y dot products and 4 into the Z row update.
// Deltas may be fp32, fp64, bf16 or fp16 (converted per tile); the accumulation
// type is fp32 (fp64 when U, V are fp64).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

#ifndef PMK_WD_JB
#define PMK_WD_JB 128
#endif
constexpr int64_t MR = 4;           // rows of D per micro-tile
constexpr int64_t JB = PMK_WD_JB;   // columns per chunk: r x JB of V and of Z stay in L1

// Determinism: the row blocks of D_k are split into a fixed number of row chunks that depends only
// on the shape, never on the thread count. Each chunk accumulates its own partial of D_k^T U and of
// ||D_k||^2, block by block in order, and the partials are then summed in chunk order. Threads only
// decide which chunk runs where, so the result is bit-identical for any number of threads.
constexpr int64_t kMaxChunks = 8;  // parallelism available to the partial sums (and their count)
constexpr int64_t kPartialBudget = int64_t(64) << 20;  // bytes of chunk partials at most

struct ChunkPlan {
  int64_t nchunks, blocks_per_chunk;
  int64_t begin(int64_t c) const { return c * blocks_per_chunk; }
  int64_t end(int64_t c, int64_t nblocks) const { return std::min(nblocks, (c + 1) * blocks_per_chunk); }
};

inline ChunkPlan chunk_plan(int64_t nblocks, int64_t partial_bytes) {
  const int64_t cap = std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(1, partial_bytes));
  const int64_t want = std::max<int64_t>(1, std::min({nblocks, kMaxChunks, cap}));
  const int64_t bpc = (nblocks + want - 1) / want;
  return {(nblocks + bpc - 1) / bpc, bpc};
}

template <int R, typename acc_t>
inline void tile_rows(const acc_t* const* d, int64_t ncols, int64_t j0,
                      const acc_t* Ut, int64_t ldu, int64_t i0,
                      const acc_t* Vt, int64_t in, acc_t* Zt, acc_t* Y, int64_t r,
                      acc_t* sq) {
  // d[m] points at row (i0 + m) of the tile, columns [j0, j0 + ncols), as acc_t.
  for (int m = 0; m < R; ++m) {
    acc_t s = 0;
    const acc_t* dm = d[m];
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < ncols; ++j) s += dm[j] * dm[j];
    sq[m] += s;
  }
  for (int64_t c = 0; c < r; ++c) {
    const acc_t* v = Vt + c * in + j0;
    acc_t* z = Zt + c * in + j0;
    const acc_t* u = Ut + c * ldu + i0;
    if constexpr (R == 4) {
      const acc_t *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
      const acc_t u0 = u[0], u1 = u[1], u2 = u[2], u3 = u[3];
      acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t j = 0; j < ncols; ++j) {
        const acc_t x0 = d0[j], x1 = d1[j], x2 = d2[j], x3 = d3[j];
        const acc_t vj = v[j];
        a0 += x0 * vj;
        a1 += x1 * vj;
        a2 += x2 * vj;
        a3 += x3 * vj;
        z[j] += u0 * x0 + u1 * x1 + u2 * x2 + u3 * x3;
      }
      Y[0 * r + c] += a0;
      Y[1 * r + c] += a1;
      Y[2 * r + c] += a2;
      Y[3 * r + c] += a3;
    } else {
      for (int m = 0; m < R; ++m) {
        const acc_t* dm = d[m];
        const acc_t um = u[m];
        acc_t a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t j = 0; j < ncols; ++j) {
          const acc_t x = dm[j];
          a += x * v[j];
          z[j] += um * x;
        }
        Y[m * r + c] += a;
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void pass_all(const std::vector<at::Tensor>& deltas, const at::Tensor& Ut, const at::Tensor& Vt,
              at::Tensor& sq, at::Tensor& Y, at::Tensor& Zt) {
  const int64_t K = static_cast<int64_t>(deltas.size());
  const int64_t r = Ut.size(0), out = Ut.size(1), in = Vt.size(1);
  const acc_t* ut = Ut.data_ptr<acc_t>();
  const acc_t* vt = Vt.data_ptr<acc_t>();
  acc_t* sqp = sq.data_ptr<acc_t>();
  acc_t* yp = Y.data_ptr<acc_t>();
  acc_t* ztp = Zt.data_ptr<acc_t>();
  const int64_t nblocks = (out + MR - 1) / MR;
  const ChunkPlan plan = chunk_plan(nblocks, r * in * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t nch = plan.nchunks;
  const int nt = static_cast<int>(std::min<int64_t>(std::max<int>(1, at::get_num_threads()), nch));
  std::vector<acc_t> zpart(static_cast<size_t>(nch) * r * in);
  std::vector<acc_t> sqpart(static_cast<size_t>(nch) * K, acc_t(0));
  std::vector<const scalar_t*> dptr(K);
  std::vector<int64_t> dld(K);
  for (int64_t k = 0; k < K; ++k) {
    dptr[k] = deltas[k].data_ptr<scalar_t>();
    dld[k] = deltas[k].stride(0);
  }

#pragma omp parallel num_threads(nt)
  {
    std::vector<acc_t> buf;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) buf.resize(MR * JB);
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* D = dptr[k];
      const int64_t ld = dld[k];
      acc_t* Yk = yp + k * out * r;
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < nch; ++ch) {
        acc_t* zl = zpart.data() + static_cast<size_t>(ch) * r * in;
        std::fill(zl, zl + r * in, acc_t(0));
        acc_t sql = 0;
        for (int64_t b = plan.begin(ch); b < plan.end(ch, nblocks); ++b) {
          const int64_t i0 = b * MR;
          const int rows = static_cast<int>(std::min<int64_t>(MR, out - i0));
          acc_t sqr[MR] = {0, 0, 0, 0};
          for (int64_t j0 = 0; j0 < in; j0 += JB) {
            const int64_t nc = std::min<int64_t>(JB, in - j0);
            const acc_t* rowp[MR];
            for (int m = 0; m < rows; ++m) {
              const scalar_t* src = D + (i0 + m) * ld + j0;
              if constexpr (std::is_same_v<scalar_t, acc_t>) {
                rowp[m] = src;
              } else {
                acc_t* dst = buf.data() + m * JB;
#pragma omp simd
                for (int64_t j = 0; j < nc; ++j) dst[j] = static_cast<acc_t>(src[j]);
                rowp[m] = dst;
              }
            }
            acc_t* Yb = Yk + i0 * r;
            switch (rows) {
              case 4: tile_rows<4, acc_t>(rowp, nc, j0, ut, out, i0, vt, in, zl, Yb, r, sqr); break;
              case 3: tile_rows<3, acc_t>(rowp, nc, j0, ut, out, i0, vt, in, zl, Yb, r, sqr); break;
              case 2: tile_rows<2, acc_t>(rowp, nc, j0, ut, out, i0, vt, in, zl, Yb, r, sqr); break;
              default: tile_rows<1, acc_t>(rowp, nc, j0, ut, out, i0, vt, in, zl, Yb, r, sqr); break;
            }
          }
          for (int m = 0; m < rows; ++m) sql += sqr[m];
        }
        sqpart[static_cast<size_t>(ch) * K + k] = sql;
      }  // implicit barrier: every chunk partial of this k is complete
      acc_t* Ztk = ztp + k * r * in;
#pragma omp for schedule(static)
      for (int64_t e = 0; e < r * in; ++e) {
        acc_t s = 0;
        for (int64_t ch = 0; ch < nch; ++ch) s += zpart[static_cast<size_t>(ch) * r * in + e];  // fixed order
        Ztk[e] = s;
      }  // implicit barrier before the partials are reset for k + 1
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    acc_t s = 0;
    for (int64_t ch = 0; ch < nch; ++ch) s += sqpart[static_cast<size_t>(ch) * K + k];
    sqp[k] = s;
  }
}

// ---------------------------------------------------------------------------
// fp32 accumulation: register-blocked micro-kernels on packed L1 tiles.
//
// A tile of D_k (TM rows x TN cols, converted to fp32 and zero-padded to
// multiples of 4) is packed once into an L1 buffer (computing ||.||^2 on the
// way), then used twice from L1:
//   phase A  Y[i, s:s+8NV] += sum_p T[i, p] V[p, s:s+8NV]    4 rows x NV vectors in registers
//   phase B  Z[j, s:s+8NV] += sum_i T[i, j] U[i, s:s+8NV]    4 cols x NV vectors in registers
// (s runs over r in slices of 16, then 8, of U, V zero-padded to RP columns).
// Each phase does 8*NV FMAs per 4 + NV loads: FMA-bound, like a GEMM micro-kernel.
typedef float v8f __attribute__((vector_size(32)));

static inline v8f ld8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
static inline v8f bc8(float x) { return v8f{x, x, x, x, x, x, x, x}; }
// Keep a loaded vector in a register: without this GCC re-reads it as a memory operand of every
// FMA that uses it, and the micro-kernels become load-port bound (measured ~1.7x slower).
#if defined(__GNUC__) && defined(__AVX__)  // a 32-byte vector fits an "x" (ymm) register
#define PMK_PIN(v) __asm__("" : "+x"(v))
#else
#define PMK_PIN(v) (void)0
#endif

constexpr int64_t TM = 64;  // tile rows
constexpr int64_t TN = 64;  // tile cols

template <int NV>
inline void phase_a(const float* T, int64_t mbp, int64_t nbp, const float* Vp, int64_t RP, float* yb) {
  // T (mbp x TN), Vp: rows of the chunk (nbp x RP), at slice offset; yb (mbp x RP) at slice offset
  for (int64_t i = 0; i < mbp; i += 4) {
    v8f acc[4][NV];
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m)
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) acc[m][q] = bc8(0.f);
    const float* t0 = T + i * TN;
    for (int64_t p = 0; p < nbp; ++p) {
      v8f vv[NV];
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) {
        vv[q] = ld8(Vp + p * RP + 8 * q);
        PMK_PIN(vv[q]);
      }
#pragma GCC unroll 4
      for (int m = 0; m < 4; ++m) {
        const v8f b = bc8(t0[m * TN + p]);
#pragma GCC unroll 2
        for (int q = 0; q < NV; ++q) acc[m][q] += b * vv[q];
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m)
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) {
        float* y = yb + (i + m) * RP + 8 * q;
        st8(y, ld8(y) + acc[m][q]);
      }
  }
}

template <int NV>
inline void phase_b(const float* T, int64_t mbp, int64_t nbp, const float* Up, int64_t RP, float* zb) {
  // T (mbp x TN), Up: rows of the block (mbp x RP), zb: rows of the chunk (nbp x RP), at slice offset
  for (int64_t j = 0; j < nbp; j += 4) {
    v8f acc[4][NV];
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m)
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) acc[m][q] = bc8(0.f);
    for (int64_t i = 0; i < mbp; ++i) {
      v8f uu[NV];
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) {
        uu[q] = ld8(Up + i * RP + 8 * q);
        PMK_PIN(uu[q]);
      }
      const float* t = T + i * TN + j;
#pragma GCC unroll 4
      for (int m = 0; m < 4; ++m) {
        const v8f b = bc8(t[m]);
#pragma GCC unroll 2
        for (int q = 0; q < NV; ++q) acc[m][q] += b * uu[q];
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m)
#pragma GCC unroll 2
      for (int q = 0; q < NV; ++q) {
        float* z = zb + (j + m) * RP + 8 * q;
        st8(z, ld8(z) + acc[m][q]);
      }
  }
}

template <typename scalar_t>
void pass_fp32(const std::vector<at::Tensor>& deltas, const at::Tensor& U, const at::Tensor& V,
               at::Tensor& sq, at::Tensor& Y, at::Tensor& Z) {
  const int64_t K = static_cast<int64_t>(deltas.size());
  const int64_t out = U.size(0), r = U.size(1), in = V.size(0);
  const int64_t RP = (r + 7) / 8 * 8;
  const int64_t out_p = (out + 3) / 4 * 4, in_p = (in + 3) / 4 * 4;
  // zero-padded copies of U (out_p x RP) and V (in_p x RP)
  std::vector<float> Up(out_p * RP, 0.f), Vp(in_p * RP, 0.f);
  {
    const float* u = U.data_ptr<float>();
    const float* v = V.data_ptr<float>();
    for (int64_t i = 0; i < out; ++i)
      for (int64_t c = 0; c < r; ++c) Up[i * RP + c] = u[i * r + c];
    for (int64_t j = 0; j < in; ++j)
      for (int64_t c = 0; c < r; ++c) Vp[j * RP + c] = v[j * r + c];
  }
  // Tile rows from the shape only (enough row blocks to spread over threads on small layers).
  int64_t tm = TM;
  while (tm > 8 && (out + tm - 1) / tm < 8) tm /= 2;
  const int64_t nblocks = (out + tm - 1) / tm;
  const ChunkPlan plan = chunk_plan(nblocks, in_p * RP * static_cast<int64_t>(sizeof(float)));
  const int64_t nch = plan.nchunks;
  const int nt = static_cast<int>(std::min<int64_t>(std::max<int>(1, at::get_num_threads()), nch));
  std::vector<float> zpart(static_cast<size_t>(nch) * in_p * RP);
  std::vector<float> sqpart(static_cast<size_t>(nch) * K, 0.f);
  float* sqp = sq.data_ptr<float>();
  float* yp = Y.data_ptr<float>();
  float* zp = Z.data_ptr<float>();

#pragma omp parallel num_threads(nt)
  {
    std::vector<float> Tbuf(TM * TN), yb(TM * RP);
    float* T = Tbuf.data();
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* D = deltas[k].data_ptr<scalar_t>();
      const int64_t ld = deltas[k].stride(0);
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < nch; ++ch) {
        float* zl = zpart.data() + static_cast<size_t>(ch) * in_p * RP;
        std::fill(zl, zl + in_p * RP, 0.f);
        float sql = 0.f;
        for (int64_t b = plan.begin(ch); b < plan.end(ch, nblocks); ++b) {
          const int64_t i0 = b * tm;
          const int64_t mb = std::min<int64_t>(tm, out - i0), mbp = (mb + 3) / 4 * 4;
          std::fill(yb.begin(), yb.end(), 0.f);
          for (int64_t j0 = 0; j0 < in; j0 += TN) {
            const int64_t nb = std::min<int64_t>(TN, in - j0), nbp = (nb + 3) / 4 * 4;
            // pack (and convert) the tile; ||D||^2 on the way
            for (int64_t i = 0; i < mbp; ++i) {
              float* trow = T + i * TN;
              if (i < mb) {
                const scalar_t* src = D + (i0 + i) * ld + j0;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t j = 0; j < nb; ++j) {
                  const float x = static_cast<float>(src[j]);
                  trow[j] = x;
                  s += x * x;
                }
                sql += s;
                for (int64_t j = nb; j < nbp; ++j) trow[j] = 0.f;
              } else {
                for (int64_t j = 0; j < nbp; ++j) trow[j] = 0.f;
              }
            }
            int64_t s = 0;
            for (; s + 16 <= RP; s += 16) {
              phase_a<2>(T, mbp, nbp, Vp.data() + j0 * RP + s, RP, yb.data() + s);
              phase_b<2>(T, mbp, nbp, Up.data() + i0 * RP + s, RP, zl + j0 * RP + s);
            }
            if (s < RP) {
              phase_a<1>(T, mbp, nbp, Vp.data() + j0 * RP + s, RP, yb.data() + s);
              phase_b<1>(T, mbp, nbp, Up.data() + i0 * RP + s, RP, zl + j0 * RP + s);
            }
          }
          for (int64_t i = 0; i < mb; ++i)
            for (int64_t c = 0; c < r; ++c) yp[((i0 + i) * K + k) * r + c] = yb[i * RP + c];
        }
        sqpart[static_cast<size_t>(ch) * K + k] = sql;
      }  // implicit barrier: all chunk partials of this k are complete
#pragma omp for schedule(static)
      for (int64_t j = 0; j < in; ++j)
        for (int64_t c = 0; c < r; ++c) {
          float acc = 0.f;
          for (int64_t ch = 0; ch < nch; ++ch)  // fixed order: independent of the thread count
            acc += zpart[(static_cast<size_t>(ch) * in_p + j) * RP + c];
          zp[(j * K + k) * r + c] = acc;
        }
      // implicit barrier before the partials are reset for k + 1
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    float acc = 0.f;
    for (int64_t ch = 0; ch < nch; ++ch) acc += sqpart[static_cast<size_t>(ch) * K + k];
    sqp[k] = acc;
  }
}

// deltas: K tensors (out, in), one dtype (fp32/fp64/bf16/fp16), rows may be strided.
// U (out, r), V (in, r): fp32 or fp64 (the accumulation type).
// Returns (sq (K,), Y (out, K, r) with Y[:, k] = D_k V, Z (in, K, r) with Z[:, k] = D_k^T U), in the
// accumulation type: the (out, K*r) / (in, K*r) layout makes the host's contractions single GEMMs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_distances_pass(at::TensorList deltas, const at::Tensor& U,
                                                                     const at::Tensor& V) {
  TORCH_CHECK(!deltas.empty(), "weight_distances_pass: deltas must hold at least one tensor");
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && U.size(1) == V.size(1) && U.size(1) >= 1,
              "weight_distances_pass: U must be (out, r) and V (in, r)");
  TORCH_CHECK(U.scalar_type() == V.scalar_type() &&
                  (U.scalar_type() == at::kFloat || U.scalar_type() == at::kDouble),
              "weight_distances_pass: U, V must share dtype float32 or float64");
  TORCH_CHECK(U.device().is_cpu() && V.device().is_cpu(), "weight_distances_pass: U, V must be CPU tensors");
  const int64_t K = static_cast<int64_t>(deltas.size());
  const int64_t out = U.size(0), r = U.size(1), in = V.size(0);
  const auto dt = deltas[0].scalar_type();
  std::vector<at::Tensor> ds;
  ds.reserve(K);
  for (int64_t k = 0; k < K; ++k) {
    const auto& d = deltas[k];
    TORCH_CHECK(d.device().is_cpu(), "weight_distances_pass: deltas must be CPU tensors");
    TORCH_CHECK(d.dim() == 2 && d.size(0) == out && d.size(1) == in,
                "weight_distances_pass: deltas[", k, "] must be (", out, ", ", in, ")");
    TORCH_CHECK(d.scalar_type() == dt, "weight_distances_pass: all deltas must share one dtype");
    // Rows may be strided (slices of a bigger tensor); columns must be unit stride.
    ds.push_back(d.stride(1) == 1 ? d : d.contiguous());
  }
  auto opts = U.options();
  if (out == 0 || in == 0)
    return {at::zeros({K}, opts), at::zeros({out, K, r}, opts), at::zeros({in, K, r}, opts)};
  at::Tensor sq = at::empty({K}, opts);
  if (U.scalar_type() == at::kFloat) {
    auto Uc = U.contiguous(), Vc = V.contiguous();
    at::Tensor Y = at::empty({out, K, r}, opts);
    at::Tensor Z = at::empty({in, K, r}, opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "weight_distances_pass", [&] {
      pass_fp32<scalar_t>(ds, Uc, Vc, sq, Y, Z);
    });
    return {sq, Y, Z};
  }
  // fp64 accumulation (gradcheck, reference use): the simple column-vectorised kernel.
  auto Ut = U.t().contiguous(), Vt = V.t().contiguous();
  at::Tensor Y = at::zeros({K, out, r}, opts);
  at::Tensor Zt = at::empty({K, r, in}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "weight_distances_pass", [&] {
    pass_all<scalar_t, double>(ds, Ut, Vt, sq, Y, Zt);
  });
  return {sq, Y.permute({1, 0, 2}).contiguous(), Zt.permute({2, 0, 1}).contiguous()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pmkernels, m) {
  m.def("weight_distances_pass(Tensor[] deltas, Tensor U, Tensor V) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pmkernels, CPU, m) {
  m.impl("weight_distances_pass", &weight_distances_pass);
}

#ifdef PMK_WD_PYMODULE
// Ahead-of-time build by setup.py (PMKERNELS_BUILD_CPP=1): importing pmkernels._C_wdist registers the op.
#include <Python.h>
PyMODINIT_FUNC PyInit__C_wdist(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_wdist", "pmkernels C++ CPU kernels (weight_distances)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
#endif

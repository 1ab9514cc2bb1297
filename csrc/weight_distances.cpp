// CPU kernel of pmkernels.weight_distances: one pass over each delta D_k.
//
// For every k it reads each element of D_k (out, in) exactly once and produces
//   sq[k]    = ||D_k||_F^2                      (K,)
//   Y[k]     = D_k V        (out, r)            (K, out, r)
//   Zt[k]    = (D_k^T U)^T  (r, in)             (K, r, in)
// from which the host gets P_k = U^T D_k V = U^T Y_k and the gradients
//   dU = sum_k Y_k dP_k^T,  dV = sum_k Z_k dP_k   (see weight_distances.py).
//
// Work split: rows of D_k in blocks of 4 over OpenMP threads; each thread keeps
// its own (r, in) partial of Zt, reduced at the end of each k. Inner loops run
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
#include <vector>

namespace {

#ifndef PMK_WD_JB
#define PMK_WD_JB 128
#endif
constexpr int64_t MR = 4;           // rows of D per micro-tile
constexpr int64_t JB = PMK_WD_JB;   // columns per chunk: r x JB of V and of Z stay in L1

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
  int nt = std::max<int>(1, at::get_num_threads());
  nt = static_cast<int>(std::min<int64_t>(nt, nblocks));
  std::vector<acc_t> zpart(static_cast<size_t>(nt) * r * in);
  std::vector<acc_t> sqpart(static_cast<size_t>(nt) * K, acc_t(0));
  std::vector<const scalar_t*> dptr(K);
  std::vector<int64_t> dld(K);
  for (int64_t k = 0; k < K; ++k) {
    dptr[k] = deltas[k].data_ptr<scalar_t>();
    dld[k] = deltas[k].stride(0);
  }

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    acc_t* zl = zpart.data() + static_cast<size_t>(tid) * r * in;
    std::vector<acc_t> buf;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) buf.resize(MR * JB);
    for (int64_t k = 0; k < K; ++k) {
      std::fill(zl, zl + r * in, acc_t(0));
      acc_t sql = 0;
      const scalar_t* D = dptr[k];
      const int64_t ld = dld[k];
      acc_t* Yk = yp + k * out * r;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nblocks; ++b) {
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
      }  // implicit barrier: every partial of this k is complete
      sqpart[static_cast<size_t>(tid) * K + k] = sql;
      acc_t* Ztk = ztp + k * r * in;
#pragma omp for schedule(static)
      for (int64_t e = 0; e < r * in; ++e) {
        acc_t s = 0;
        for (int t = 0; t < nt; ++t) s += zpart[static_cast<size_t>(t) * r * in + e];
        Ztk[e] = s;
      }  // implicit barrier before the partials are reset for k + 1
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    acc_t s = 0;
    for (int t = 0; t < nt; ++t) s += sqpart[static_cast<size_t>(t) * K + k];
    sqp[k] = s;
  }
}

// deltas: K tensors (out, in), unit column stride, one dtype (fp32/fp64/bf16/fp16).
// Ut (r, out), Vt (r, in): contiguous, fp32 or fp64 (the accumulation type).
// Returns (sq (K,), Y (K, out, r), Zt (K, r, in)) in the accumulation type.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_distances_pass(at::TensorList deltas, const at::Tensor& Ut,
                                                                     const at::Tensor& Vt) {
  TORCH_CHECK(!deltas.empty(), "weight_distances_pass: deltas must hold at least one tensor");
  TORCH_CHECK(Ut.dim() == 2 && Vt.dim() == 2 && Ut.size(0) == Vt.size(0),
              "weight_distances_pass: Ut must be (r, out) and Vt (r, in)");
  TORCH_CHECK(Ut.scalar_type() == Vt.scalar_type() &&
                  (Ut.scalar_type() == at::kFloat || Ut.scalar_type() == at::kDouble),
              "weight_distances_pass: Ut, Vt must share dtype float32 or float64");
  const int64_t K = static_cast<int64_t>(deltas.size());
  const int64_t r = Ut.size(0), out = Ut.size(1), in = Vt.size(1);
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
  auto Utc = Ut.contiguous(), Vtc = Vt.contiguous();
  auto opts = Ut.options();
  at::Tensor sq = at::empty({K}, opts);
  at::Tensor Y = at::zeros({K, out, r}, opts);
  at::Tensor Zt = at::empty({K, r, in}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "weight_distances_pass", [&] {
    if (Ut.scalar_type() == at::kDouble) {
      pass_all<scalar_t, double>(ds, Utc, Vtc, sq, Y, Zt);
    } else {
      pass_all<scalar_t, float>(ds, Utc, Vtc, sq, Y, Zt);
    }
  });
  return {sq, Y, Zt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pmkernels, m) {
  m.def("weight_distances_pass(Tensor[] deltas, Tensor Ut, Tensor Vt) -> (Tensor, Tensor, Tensor)");
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

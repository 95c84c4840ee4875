// Host emulation of the attention kernels' tensor-core data paths (csrc/attention/
// flash_fwd.cuh, flash_bwd.cuh) with the index maps of flash_layout.h: ldmatrix (.x4,
// .trans) from the padded shared tiles and mma.m16n8k16 are emulated from the PTX ISA's
// definitions, written here independently of the kernels' helpers, and every product the
// kernels form (S = Q K^T, O = P V, S^T = K Q^T, dV = P^T dO, dQ = dS K from dS^T) is
// compared with the plain matrix product. Also: the shared-memory bank pattern of every
// ldmatrix phase, and the causal/tail tile predicates against brute force.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "attention/flash_layout.h"
#include "attention/generated/head_dims.h"

namespace ly = llmcore::attention::layout;

namespace {

int g_failures = 0;
#define EXPECT(cond, ...)                          \
  do {                                             \
    if (!(cond)) {                                 \
      if (++g_failures < 20) {                     \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                  \
        std::printf("\n");                         \
      }                                            \
    }                                              \
  } while (0)

// A padded shared tile of small integers (exact in doubles and in fp16/bf16).
struct Tile {
  int rows, cols, stride;
  std::vector<double> v;
  Tile(int r, int c) : rows(r), cols(c), stride(ly::smem_stride(c)), v(static_cast<size_t>(r) * stride, 1e30) {
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < c; ++j) v[i * stride + j] = ((i * 7 + j * 3) % 11) - 5;
  }
  double at(int r, int c) const { return v[r * stride + c]; }
};

// One 32-bit register: two 16-bit elements (lo, hi).
struct Reg {
  double lo, hi;
};

// ldmatrix.x4 (optionally .trans): offset[lane] = element offset of lane's row address.
// PTX: lanes 8i..8i+7 address the rows of matrix i; without .trans lane l receives matrix
// i's row l/4, elements 2(l%4), 2(l%4)+1; with .trans its column l/4, rows 2(l%4), 2(l%4)+1.
void ldmatrix(Reg out[32][4], const Tile& t, const int offset[32], bool trans) {
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int g = lane / 4, q = lane % 4;
      if (!trans) {
        const int base = offset[8 * i + g];
        out[lane][i] = {t.v[base + 2 * q], t.v[base + 2 * q + 1]};
      } else {
        out[lane][i] = {t.v[offset[8 * i + 2 * q] + g], t.v[offset[8 * i + 2 * q + 1] + g]};
      }
    }
}

// mma.m16n8k16: rebuild A (16x16), B (16x8) from the fragments as the PTX ISA defines
// them, d += A B, scattered back in the C layout.
void mma(double d[32][4], const Reg a[32][4], const Reg b[32][2]) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, q = lane % 4;
    // a0: (g, 2q..), a1: (g+8, 2q..), a2: (g, 2q+8..), a3: (g+8, 2q+8..)
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
    for (int r = 0; r < 4; ++r) {
      A[ar[r]][ac[r]] = a[lane][r].lo;
      A[ar[r]][ac[r] + 1] = a[lane][r].hi;
    }
    // b0: (k 2q, 2q+1; n g), b1: (k 2q+8, 2q+9; n g)
    B[2 * q][g] = b[lane][0].lo;
    B[2 * q + 1][g] = b[lane][0].hi;
    B[2 * q + 8][g] = b[lane][1].lo;
    B[2 * q + 9][g] = b[lane][1].hi;
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, q = lane % 4;
    const int cr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int r = 0; r < 4; ++r) {
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[cr[r]][k] * B[k][cc[r]];
      d[lane][r] += s;
      // The kernels' view of the same register.
      EXPECT(ly::c_row(lane, r) == cr[r] && ly::c_col(lane, r) == cc[r], "c layout lane %d r %d", lane, r);
    }
  }
}

// C registers of n8 tiles (2kk, 2kk+1) -> A registers (the kernels' c_to_a).
void c_to_a(Reg a[32][4], const double c0[32][4], const double c1[32][4]) {
  for (int l = 0; l < 32; ++l) {
    a[l][0] = {c0[l][0], c0[l][1]};
    a[l][1] = {c0[l][2], c0[l][3]};
    a[l][2] = {c1[l][0], c1[l][1]};
    a[l][3] = {c1[l][2], c1[l][3]};
  }
}

// S = A B^T with A rows [a0, a0+16) of a [.., K] tile via ldm_a, B = rows of a [N][K] tile via
// ldm_b (the kernels' Q K^T and K Q^T / V dO^T loops).
void check_abt(const Tile& a, int a0, const Tile& bt, int K, int N, const char* what) {
  std::vector<double> acc(static_cast<size_t>(N / 8) * 32 * 4, 0.0);
  auto tile = [&](int j) { return reinterpret_cast<double(*)[4]>(&acc[static_cast<size_t>(j) * 128]); };
  for (int kk = 0; kk < K / 16; ++kk) {
    int off_a[32];
    for (int l = 0; l < 32; ++l) off_a[l] = (a0 + ly::ldm_a_row(l)) * a.stride + kk * 16 + ly::ldm_a_col(l);
    Reg fa[32][4];
    ldmatrix(fa, a, off_a, false);
    for (int np = 0; np < N / 16; ++np) {
      int off_b[32];
      for (int l = 0; l < 32; ++l) off_b[l] = (np * 16 + ly::ldm_b_row(l)) * bt.stride + kk * 16 + ly::ldm_b_col(l);
      Reg fb[32][4], b0[32][2], b1[32][2];
      ldmatrix(fb, bt, off_b, false);
      for (int l = 0; l < 32; ++l) {
        b0[l][0] = fb[l][0]; b0[l][1] = fb[l][1];
        b1[l][0] = fb[l][2]; b1[l][1] = fb[l][3];
      }
      mma(tile(2 * np), fa, b0);
      mma(tile(2 * np + 1), fa, b1);
    }
  }
  for (int j = 0; j < N / 8; ++j)
    for (int l = 0; l < 32; ++l)
      for (int r = 0; r < 4; ++r) {
        const int m = ly::c_row(l, r), n = j * 8 + ly::c_col(l, r);
        double want = 0;
        for (int k = 0; k < K; ++k) want += a.at(a0 + m, k) * bt.at(n, k);
        EXPECT(tile(j)[l][r] == want, "%s: (%d, %d) got %g want %g", what, m, n, tile(j)[l][r], want);
      }
}

// C = P (16 x K, from registers in the C layout) @ Y [K][N] with Y by ldmatrix.trans at the
// ldm_a addresses (the kernels' P V, P^T dO, dS^T Q, dS K).
// Or, with a_from_smem_t: A[m][k] = X[k][m0 + m] from X [K][..] by .trans at ldm_b addresses.
void check_a_y(int K, int N, const Tile& y, const Tile* xt, int xt_col0, const char* what) {
  // P in C layout: n8 tiles over K; value P[m][k] = (m * 5 + k * 2) % 7 - 3.
  auto pval = [](int m, int k) { return static_cast<double>((m * 5 + k * 2) % 7 - 3); };
  std::vector<double> pc(static_cast<size_t>(K / 8) * 128);
  auto ptile = [&](int j) { return reinterpret_cast<double(*)[4]>(&pc[static_cast<size_t>(j) * 128]); };
  for (int j = 0; j < K / 8; ++j)
    for (int l = 0; l < 32; ++l)
      for (int r = 0; r < 4; ++r) ptile(j)[l][r] = pval(ly::c_row(l, r), j * 8 + ly::c_col(l, r));
  std::vector<double> acc(static_cast<size_t>(N / 8) * 128, 0.0);
  auto tile = [&](int j) { return reinterpret_cast<double(*)[4]>(&acc[static_cast<size_t>(j) * 128]); };
  for (int kk = 0; kk < K / 16; ++kk) {
    Reg fa[32][4];
    if (xt == nullptr) {
      c_to_a(fa, ptile(2 * kk), ptile(2 * kk + 1));
    } else {
      int off[32];
      for (int l = 0; l < 32; ++l) off[l] = (kk * 16 + ly::ldm_b_row(l)) * xt->stride + xt_col0 + ly::ldm_b_col(l);
      ldmatrix(fa, *xt, off, true);
    }
    for (int dp = 0; dp < N / 16; ++dp) {
      int off[32];
      for (int l = 0; l < 32; ++l) off[l] = (kk * 16 + ly::ldm_a_row(l)) * y.stride + dp * 16 + ly::ldm_a_col(l);
      Reg fb[32][4], b0[32][2], b1[32][2];
      ldmatrix(fb, y, off, true);
      for (int l = 0; l < 32; ++l) {
        b0[l][0] = fb[l][0]; b0[l][1] = fb[l][1];
        b1[l][0] = fb[l][2]; b1[l][1] = fb[l][3];
      }
      mma(tile(2 * dp), fa, b0);
      mma(tile(2 * dp + 1), fa, b1);
    }
  }
  for (int j = 0; j < N / 8; ++j)
    for (int l = 0; l < 32; ++l)
      for (int r = 0; r < 4; ++r) {
        const int m = ly::c_row(l, r), n = j * 8 + ly::c_col(l, r);
        double want = 0;
        for (int k = 0; k < K; ++k)
          want += (xt == nullptr ? pval(m, k) : xt->at(k, xt_col0 + m)) * y.at(k, n);
        EXPECT(tile(j)[l][r] == want, "%s: (%d, %d) got %g want %g", what, m, n, tile(j)[l][r], want);
      }
}

// The 8 row addresses of each ldmatrix phase hit 8 distinct 16-byte bank groups.
void check_banks(int cols, const char* what) {
  const int stride_bytes = ly::smem_stride(cols) * 2;
  for (int row0 = 0; row0 < 64; row0 += 8)
    for (int c = 0; c < cols; c += 8) {
      bool seen[8] = {};
      for (int r = 0; r < 8; ++r) {
        const int group = ((row0 + r) * stride_bytes + c * 2) / 16 % 8;
        EXPECT(!seen[group], "%s: bank conflict at rows %d.., col %d", what, row0, c);
        seen[group] = true;
      }
    }
}

// Tile predicates against brute force over small sequences.
void check_geometry() {
  for (int causal = 0; causal < 2; ++causal)
    for (int sq = 1; sq <= 40; sq += 3)
      for (int sk = 1; sk <= 40; sk += 5)
        for (int rows : {8, 16})
          for (int cols : {8, 16}) {
            for (int m0 = 0; m0 < sq; m0 += rows) {
              const long long lim = ly::key_limit(m0, rows, sq, sk, causal);
              for (int i = m0; i < m0 + rows && i < sq; ++i)
                for (int j = 0; j < sk; ++j)
                  if (ly::visible(i, j, sq, sk, causal))
                    EXPECT(j < lim, "key_limit sq %d sk %d m0 %d: key %d seen", sq, sk, m0, j);
              for (int n0 = 0; n0 < lim; n0 += cols) {
                if (ly::tile_needs_mask(m0, n0, cols, sq, sk, causal)) continue;
                for (int i = m0; i < m0 + rows && i < sq; ++i)
                  for (int j = n0; j < n0 + cols; ++j)
                    EXPECT(ly::visible(i, j, sq, sk, causal), "unmasked tile hides (%d, %d) sq %d sk %d",
                           i, j, sq, sk);
              }
            }
            for (int n0 = 0; n0 < sk; n0 += cols) {
              const int first = ly::first_query_block(n0, rows, sq, sk, causal);
              for (int i = 0; i < first * rows && i < sq; ++i)
                for (int j = n0; j < n0 + cols && j < sk; ++j)
                  EXPECT(!ly::visible(i, j, sq, sk, causal), "first_query_block skips (%d, %d)", i, j);
            }
          }
}

}  // namespace

int main() {
#define LLMCORE_HEAD_DIM_ITEM(d) d,
  for (int d : {LLMCORE_ATTENTION_FWD_HEAD_DIMS(LLMCORE_HEAD_DIM_ITEM)}) {
    char name[64];
    const Tile q(64, d), k(64, d), v(64, d);
    std::snprintf(name, sizeof name, "S = Q K^T d%d", d);
    check_abt(q, 16, k, d, 64, name);          // warp 1's rows, 64 keys
    std::snprintf(name, sizeof name, "O = P V d%d", d);
    check_a_y(64, d, v, nullptr, 0, name);     // P 16 x 64 keys
    std::snprintf(name, sizeof name, "S^T = K Q^T d%d", d);
    check_abt(k, 48, q, d, 32, name);          // warp 3's keys, 32 queries
    std::snprintf(name, sizeof name, "S^T = K Q^T (16 queries) d%d", d);
    check_abt(k, 32, q, d, 16, name);          // the d128 backward's kBr = 16
    const Tile ds_t16(64, 16), ds_t(64, 32), ds_t64(64, 64);  // dS^T [keys][queries]
    std::snprintf(name, sizeof name, "dQ = dS K d%d", d);
    check_a_y(64, d, k, &ds_t16, 0, name);     // the only query row tile
    check_a_y(64, d, k, &ds_t, 16, name);      // query row tile 1 of 2
    check_a_y(64, d, k, &ds_t64, 48, name);    // query row tile 3 of 4
    std::snprintf(name, sizeof name, "banks d%d", d);
    check_banks(d, name);
  }
  check_banks(16, "banks dS^T kBr 16");
  check_banks(32, "banks dS^T kBr 32");
  check_banks(64, "banks dS^T kBr 64");
  check_geometry();
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("attention layout: all checks passed\n");
  return 0;
}

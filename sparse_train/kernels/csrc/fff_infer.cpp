// Hard FFF inference on CPU, fp32: tree descent and leaf FFNs in one call, no per-token Python.
//
//   1. descent, parallel over blocks of TB tokens: d dot products per token against the node
//      rows it visits (node n's children are 2n+1, 2n+2; right iff <w_n, x> + b_n >= 0), so
//      the all-node logit matmul (T x N x D) is never formed. A block's tokens advance level
//      by level together: TB independent dot products the core overlaps;
//   2. a counting sort of tokens by leaf;
//   3. leaves: those with many tokens and wide hidden layers as BLAS GEMMs over their gathered
//      rows; the others parallel over blocks of up to TB tokens of one leaf, each leaf's weights
//      read once per block, hidden = act(x @ w_in[leaf]), out = hidden @ w_out[leaf], both as
//      register-blocked micro-kernels (TB tokens x V outputs of accumulators, V = one vector),
//      or, for blocks of a few tokens or wide rows, where reading the weights is the cost,
//      streaming the weights row by row.
// Leaf kinds: GELU (w_in [L, D, F], w_out [L, F, O]) and SwiGLU (w_in = [gate | up] [L, D, 2F],
// w_out [L, F, O]). Parallelism is ATen's intra-op pool (at::parallel_for, OpenMP).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t TB = 8;  // tokens per block
constexpr int64_t V = 16;  // accumulator width (one AVX-512 register of floats)
// A leaf with at least this many tokens and this hidden width runs as BLAS GEMMs instead
// (measured on 2 cores: BLAS wins from ~64 tokens of width >= 64; below, call overheads dominate).
constexpr int64_t kBlasMinTokens = 64;
constexpr int64_t kBlasMinWidth = 64;
// Blocks of at most this many tokens, or with weight rows at least this wide, stream the leaf's
// weights row by row (stream_matmul).
constexpr int64_t kStreamMaxTokens = 4;
constexpr int64_t kStreamMinWidth = 128;

inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)); }
inline float silu(float v) { return v / (1.f + std::exp(-v)); }

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// out[b][j] = sum_k a[b][k] * w[k][j] for b < TB (rows a[b], TB of them), j < J; w row stride J.
// Full V-wide column chunks run as a TB x V register block; the tail columns plainly.
void block_matmul(const float* const* a, int64_t K, const float* w, int64_t J, float* out, int64_t out_stride) {
  int64_t j0 = 0;
  for (; j0 + V <= J; j0 += V) {
    float acc[TB][V] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float* wr = w + k * J + j0;
      for (int64_t b = 0; b < TB; ++b) {
        const float ab = a[b][k];
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) acc[b][v] += ab * wr[v];
      }
    }
    for (int64_t b = 0; b < TB; ++b)
      for (int64_t v = 0; v < V; ++v) out[b * out_stride + j0 + v] = acc[b][v];
  }
  const int64_t tail = J - j0;  // < V columns left: the same block, narrower
  if (tail > 0) {
    float acc[TB][V] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float* wr = w + k * J + j0;
      for (int64_t b = 0; b < TB; ++b) {
        const float ab = a[b][k];
        for (int64_t v = 0; v < tail; ++v) acc[b][v] += ab * wr[v];
      }
    }
    for (int64_t b = 0; b < TB; ++b)
      for (int64_t v = 0; v < tail; ++v) out[b * out_stride + j0 + v] = acc[b][v];
  }
}

// The same product for n <= TB rows, streaming w row by row (axpy order): every weight is read
// once, in address order, which the prefetcher follows, and each loaded weight vector feeds two
// tokens. For blocks whose weights (not the arithmetic) are the cost: few tokens, or rows wider
// than a register block, where block_matmul's walk down columns touches one cache line per row,
// a row's width apart (measured on 2 AVX2 cores: 4x slower than this on 512 x 256
// leaves that are not in cache). The rows kPrefetchRows ahead are requested while these are
// used, since a 4 KiB page ends every few rows and the hardware prefetcher stops there.
constexpr int64_t kPrefetchRows = 16;

void stream_matmul(const float* const* a, int64_t n, int64_t K, const float* w, int64_t J, float* out,
                   int64_t out_stride) {
  for (int64_t b = 0; b < n; ++b) std::fill(out + b * out_stride, out + b * out_stride + J, 0.f);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {  // four rows per pass: four FMAs per load and store of the output
    const float* __restrict__ w0 = w + k * J;
    const float* __restrict__ w1 = w0 + J;
    const float* __restrict__ w2 = w1 + J;
    const float* __restrict__ w3 = w2 + J;
    if (k + kPrefetchRows + 4 <= K)
      for (int64_t j = 0; j < 4 * J; j += 16) __builtin_prefetch(w0 + kPrefetchRows * J + j, 0, 0);
    int64_t b = 0;
    for (; b + 2 <= n; b += 2) {  // two tokens per pass over the four rows
      const float p0 = a[b][k], p1 = a[b][k + 1], p2 = a[b][k + 2], p3 = a[b][k + 3];
      const float q0 = a[b + 1][k], q1 = a[b + 1][k + 1], q2 = a[b + 1][k + 2], q3 = a[b + 1][k + 3];
      float* __restrict__ o = out + b * out_stride;
      float* __restrict__ u = o + out_stride;
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) {
        const float x0 = w0[j], x1 = w1[j], x2 = w2[j], x3 = w3[j];
        o[j] += p0 * x0 + p1 * x1 + p2 * x2 + p3 * x3;
        u[j] += q0 * x0 + q1 * x1 + q2 * x2 + q3 * x3;
      }
    }
    for (; b < n; ++b) {
      const float p0 = a[b][k], p1 = a[b][k + 1], p2 = a[b][k + 2], p3 = a[b][k + 3];
      float* __restrict__ o = out + b * out_stride;
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) o[j] += p0 * w0[j] + p1 * w1[j] + p2 * w2[j] + p3 * w3[j];
    }
  }
  for (; k < K; ++k) {
    const float* wr = w + k * J;
    for (int64_t b = 0; b < n; ++b) {
      const float ab = a[b][k];
      float* o = out + b * out_stride;
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) o[j] += ab * wr[j];
    }
  }
}

// Which kernel a block of n tokens uses for a [K, J] weight: register blocks for narrow rows
// with enough tokens to reuse each loaded weight, the row stream otherwise.
inline bool use_stream(int64_t n_tok, int64_t J) { return n_tok <= kStreamMaxTokens || J >= kStreamMinWidth; }

// leaf[t] for the TB tokens from `begin` (rows past T repeat the last token and are not written).
void descend_block(const float* x, const float* node_w, const float* node_b, int64_t T, int64_t D, int64_t depth,
                   int64_t begin, int64_t* leaf) {
  const float* rows[TB];
  for (int64_t b = 0; b < TB; ++b) rows[b] = x + std::min(begin + b, T - 1) * D;
  int64_t node[TB] = {0};
  for (int64_t level = 0; level < depth; ++level) {
    float acc[TB][V] = {};
    int64_t k0 = 0;
    for (; k0 + V <= D; k0 += V)
      for (int64_t b = 0; b < TB; ++b) {
        const float* xr = rows[b] + k0;
        const float* wr = node_w + node[b] * D + k0;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) acc[b][v] += xr[v] * wr[v];
      }
    for (int64_t b = 0; b < TB; ++b) {
      float s = 0.f;
      for (int64_t v = 0; v < V; ++v) s += acc[b][v];
      for (int64_t k = k0; k < D; ++k) s += rows[b][k] * node_w[node[b] * D + k];
      node[b] = 2 * node[b] + (s + node_b[node[b]] >= 0.f ? 2 : 1);
    }
  }
  const int64_t first_leaf = (int64_t(1) << depth) - 1;
  for (int64_t b = 0; b < TB && begin + b < T; ++b) leaf[begin + b] = node[b] - first_leaf;
}

}  // namespace

// x [T, D], node_w [N, D], node_b [N], w_in [L, D, H], w_out [L, F, O]; H = F (gelu) or 2F (swiglu).
// Returns (y [T, O], leaf [T] int64, tokens per leaf [L] int64).
std::vector<torch::Tensor> fff_hard_forward(torch::Tensor x, torch::Tensor node_w, torch::Tensor node_b,
                                            torch::Tensor w_in, torch::Tensor w_out, int64_t depth, bool swiglu) {
  check(x, "x"); check(node_w, "node_w"); check(node_b, "node_b"); check(w_in, "w_in"); check(w_out, "w_out");
  const int64_t T = x.size(0), D = x.size(1), L = w_in.size(0), H = w_in.size(2), F = w_out.size(1),
                O = w_out.size(2), N = node_w.size(0);
  TORCH_CHECK(N == (int64_t(1) << depth) - 1 && L == N + 1, "node/leaf counts do not match depth ", depth);
  TORCH_CHECK(node_w.size(1) == D && w_in.size(1) == D && H == (swiglu ? 2 * F : F), "weight shapes disagree");

  auto leaf = torch::empty({T}, torch::kInt64);
  auto counts = torch::zeros({L}, torch::kInt64);
  auto y = torch::empty({T, O}, torch::kFloat32);
  if (T == 0) return {y, leaf, counts};
  const float *xp = x.data_ptr<float>(), *nwp = node_w.data_ptr<float>(), *nbp = node_b.data_ptr<float>();
  const float *wip = w_in.data_ptr<float>(), *wop = w_out.data_ptr<float>();
  int64_t* leafp = leaf.data_ptr<int64_t>();
  int64_t* countp = counts.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();

  at::parallel_for(0, (T + TB - 1) / TB, 8, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) descend_block(xp, nwp, nbp, T, D, depth, blk * TB, leafp);
  });

  // counting sort of tokens by leaf
  std::vector<int64_t> start(L + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) ++countp[leafp[t]];
  for (int64_t l = 0; l < L; ++l) start[l + 1] = start[l] + countp[l];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) order[fill[leafp[t]]++] = t;
  }

  // Leaves holding many tokens with wide hidden layers: BLAS GEMMs on their gathered rows, one
  // leaf at a time with every thread inside the GEMM. The rest: blocks of up to TB sorted tokens
  // of one leaf, spread over the threads, so every thread has work whether tokens spread over
  // many leaves (small batches) or crowd into a few.
  auto order_t = torch::from_blob(order.data(), {T}, torch::kInt64);
  std::vector<int64_t> blk_leaf, blk_start;
  for (int64_t l = 0; l < L; ++l) {
    if (countp[l] >= kBlasMinTokens && F >= kBlasMinWidth) {
      auto idx = order_t.slice(0, start[l], start[l + 1]);
      auto hidden = at::mm(x.index_select(0, idx), w_in[l]);
      auto act = swiglu ? at::silu(hidden.slice(1, 0, F)) * hidden.slice(1, F, H) : at::gelu(hidden);
      y.index_copy_(0, idx, at::mm(act, w_out[l]));
      continue;
    }
    for (int64_t i = start[l]; i < start[l + 1]; i += TB) {
      blk_leaf.push_back(l);
      blk_start.push_back(i);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(blk_leaf.size()), 2, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden(TB * H), act(TB * F), out(TB * O);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t l = blk_leaf[blk], i = blk_start[blk];
      const int64_t n_tok = std::min(TB, start[l + 1] - i);
      const float* x_rows[TB];
      const float* act_rows[TB];
      for (int64_t b = 0; b < TB; ++b) {  // a short block repeats its last token; the copy is not written
        x_rows[b] = xp + order[i + std::min(b, n_tok - 1)] * D;
        act_rows[b] = act.data() + std::min(b, n_tok - 1) * F;
      }
      if (use_stream(n_tok, H)) {
        stream_matmul(x_rows, n_tok, D, wip + l * D * H, H, hidden.data(), H);
      } else {
        block_matmul(x_rows, D, wip + l * D * H, H, hidden.data(), H);
      }
      for (int64_t b = 0; b < n_tok; ++b) {  // the repeated rows reuse the last token's activations
        const float* h = hidden.data() + b * H;
        float* a = act.data() + b * F;
        if (swiglu) {
          for (int64_t j = 0; j < F; ++j) a[j] = silu(h[j]) * h[F + j];
        } else {
          for (int64_t j = 0; j < F; ++j) a[j] = gelu(h[j]);
        }
      }
      if (use_stream(n_tok, O)) {
        stream_matmul(act_rows, n_tok, F, wop + l * F * O, O, out.data(), O);
      } else {
        block_matmul(act_rows, F, wop + l * F * O, O, out.data(), O);
      }
      for (int64_t b = 0; b < n_tok; ++b) std::copy_n(out.data() + b * O, O, yp + order[i + b] * O);
    }
  });
  return {y, leaf, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fff_hard_forward", &fff_hard_forward, "hard FFF descent + grouped leaf FFNs (CPU, fp32)");
}

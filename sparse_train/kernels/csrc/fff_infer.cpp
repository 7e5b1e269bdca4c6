// Hard FFF inference on CPU, fp32: tree descent and leaf FFNs in one call, no per-token Python.
//
//   1. descent, parallel over tokens: d dot products per token against the node rows it visits
//      (node n's children are 2n+1, 2n+2; right iff <w_n, x> + b_n >= 0), so the all-node logit
//      matmul (T x N x D) is never formed;
//   2. a counting sort of tokens by leaf;
//   3. leaves, parallel over leaves: each leaf's weights are read once for all of its tokens,
//      hidden = act(x @ w_in[leaf]) with the hidden width innermost (vectorised), then
//      out = hidden @ w_out[leaf] with the output width innermost (vectorised).
// Leaf kinds: GELU (w_in [L, D, F], w_out [L, F, O]) and SwiGLU (w_in = [gate | up] [L, D, 2F],
// w_out [L, F, O]). Parallelism is ATen's intra-op pool (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)); }
inline float silu(float v) { return v / (1.f + std::exp(-v)); }

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// x [T, D], node_w [N, D], node_b [N], w_in [L, D, H], w_out [L, F, O]; H = F (gelu) or 2F (swiglu).
// Returns (y [T, O], leaf [T] int64).
std::vector<torch::Tensor> fff_hard_forward(torch::Tensor x, torch::Tensor node_w, torch::Tensor node_b,
                                            torch::Tensor w_in, torch::Tensor w_out, int64_t depth, bool swiglu) {
  check(x, "x"); check(node_w, "node_w"); check(node_b, "node_b"); check(w_in, "w_in"); check(w_out, "w_out");
  const int64_t T = x.size(0), D = x.size(1), L = w_in.size(0), H = w_in.size(2), F = w_out.size(1),
                O = w_out.size(2), N = node_w.size(0);
  TORCH_CHECK(N == (int64_t(1) << depth) - 1 && L == N + 1, "node/leaf counts do not match depth ", depth);
  TORCH_CHECK(node_w.size(1) == D && w_in.size(1) == D && H == (swiglu ? 2 * F : F), "weight shapes disagree");

  auto leaf = torch::empty({T}, torch::kInt64);
  auto y = torch::empty({T, O}, torch::kFloat32);
  const float *xp = x.data_ptr<float>(), *nwp = node_w.data_ptr<float>(), *nbp = node_b.data_ptr<float>();
  const float *wip = w_in.data_ptr<float>(), *wop = w_out.data_ptr<float>();
  int64_t* leafp = leaf.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();

  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t n = 0;
      for (int64_t level = 0; level < depth; ++level) {
        const float c = dot(xp + t * D, nwp + n * D, D) + nbp[n];
        n = 2 * n + (c >= 0.f ? 2 : 1);
      }
      leafp[t] = n - N;
    }
  });

  // counting sort of tokens by leaf
  std::vector<int64_t> start(L + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) ++start[leafp[t] + 1];
  for (int64_t l = 0; l < L; ++l) start[l + 1] += start[l];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) order[fill[leafp[t]]++] = t;
  }

  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden(H), act(F);
    for (int64_t l = begin; l < end; ++l) {
      const float* wi = wip + l * D * H;
      const float* wo = wop + l * F * O;
      for (int64_t i = start[l]; i < start[l + 1]; ++i) {
        const int64_t t = order[i];
        const float* xr = xp + t * D;
        std::fill(hidden.begin(), hidden.end(), 0.f);
        float* h = hidden.data();
        for (int64_t k = 0; k < D; ++k) {
          const float xk = xr[k];
          const float* row = wi + k * H;
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) h[j] += xk * row[j];
        }
        float* a = act.data();
        if (swiglu) {
          for (int64_t j = 0; j < F; ++j) a[j] = silu(h[j]) * h[F + j];
        } else {
          for (int64_t j = 0; j < F; ++j) a[j] = gelu(h[j]);
        }
        float* out = yp + t * O;
        std::fill(out, out + O, 0.f);
        for (int64_t j = 0; j < F; ++j) {
          const float aj = a[j];
          const float* row = wo + j * O;
#pragma omp simd
          for (int64_t c = 0; c < O; ++c) out[c] += aj * row[c];
        }
      }
    }
  });
  return {y, leaf};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fff_hard_forward", &fff_hard_forward, "hard FFF descent + grouped leaf FFNs (CPU, fp32)");
}

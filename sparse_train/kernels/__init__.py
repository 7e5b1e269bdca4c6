"""Expert-compute kernels: one module per kernel family, each with a torch reference beside it.

grouped_gemm     [T,K] x [G,K,N] by group, optional fused row gather / scatter
permute          gather rows into expert order; count_per_expert, the group sizes
unpermute        weighted scatter-add of rows back to their tokens
swiglu_experts   the whole routed SwiGLU expert MLP with gather and scatter fused in
flops            their FLOP formulas, for torch's FlopCounterMode
"""

from sparse_train.kernels import flops  # noqa: F401  (FlopCounterMode formulas of the ops below)
from sparse_train.kernels.expert_mlp import swiglu_experts
from sparse_train.kernels.grouped_gemm import BACKENDS, grouped_gemm, resolve_backend, triton_available
from sparse_train.kernels.permute import count_per_expert, permute, unpermute

__all__ = [
    "BACKENDS",
    "count_per_expert",
    "grouped_gemm",
    "permute",
    "resolve_backend",
    "swiglu_experts",
    "triton_available",
    "unpermute",
]

"""Expert-compute kernels: one module per kernel family, each with a torch reference beside it."""

from sparse_train.kernels.grouped_gemm import grouped_gemm

__all__ = ["grouped_gemm"]

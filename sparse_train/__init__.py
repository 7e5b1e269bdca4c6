"""sparse_train: training Mixture-of-Experts and Fast Feedforward models, one CPU to many GPUs."""

__version__ = "0.1.0"

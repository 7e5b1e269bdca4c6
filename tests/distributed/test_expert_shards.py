"""FSDP's placement of expert weights: dimension 0 when the local experts split evenly over the
edp ranks, else a dimension that does (no padded all-gathers); the layout test
`ep2-edp2-odd-local-experts` shows the training it gives is the single process's."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import Shard

from sparse_train.parallel.data import even_expert_shards


def test_experts_that_split_evenly_keep_fsdps_dimension_0():
    assert even_expert_shards(2)(nn.Parameter(torch.empty(4, 64, 2, 32))) is None


def test_fewer_local_experts_than_ranks_shard_the_first_even_dimension():
    assert even_expert_shards(2)(nn.Parameter(torch.empty(3, 64, 2, 32))) == Shard(1)
    assert even_expert_shards(128)(nn.Parameter(torch.empty(16, 7168, 2, 2048))) == Shard(1)
    assert even_expert_shards(4)(nn.Parameter(torch.empty(3, 6, 2, 32))) == Shard(3)


def test_no_even_dimension_leaves_fsdps_default():
    assert even_expert_shards(7)(nn.Parameter(torch.empty(3, 6, 2, 4))) is None

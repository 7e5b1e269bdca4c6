"""Global-batch load balancing: f_i counted over all data-parallel ranks and the step's micro-batches."""

from __future__ import annotations

import torch

from sparse_train.config import MoEConfig, RouterConfig
from sparse_train.launch.local import run_ranks
from sparse_train.models.losses import GlobalBatchCounts
from sparse_train.models.moe import MoELayer
from sparse_train.parallel.collectives import SumOverGroup


def _layer(scope: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(
        8, MoEConfig(num_experts=6, expert_hidden=8, kernel_backend="torch"), RouterConfig(top_k=2, balance_scope=scope)
    )
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    return layer


def _tokens(rank: int) -> torch.Tensor:
    # Different ranks see differently distributed tokens, so per-rank f_i differ from the global one.
    g = torch.Generator().manual_seed(rank)
    return torch.randn(3, 5, 8, generator=g) + 2.0 * rank


def _global_loss_on_rank() -> tuple[float, torch.Tensor]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    layer = _layer("global_batch")
    layer.count_sync.reduce_across_ranks = SumOverGroup(dist.group.WORLD)
    _, aux = layer(_tokens(dist.get_rank()))
    aux.lb_loss.backward()
    return float(aux.lb_loss.detach()), layer.router.weight.grad


def test_global_batch_loss_on_two_ranks_equals_loss_of_the_concatenated_batch():
    per_rank = run_ranks(_global_loss_on_rank, 2)
    mean_loss = sum(loss for loss, _ in per_rank) / 2
    mean_grad = sum(grad for _, grad in per_rank) / 2  # what data-parallel averaging applies

    layer = _layer("micro_batch")
    _, aux = layer(torch.cat([_tokens(0), _tokens(1)]))
    aux.lb_loss.backward()
    torch.testing.assert_close(torch.tensor(mean_loss), aux.lb_loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean_grad, layer.router.weight.grad, rtol=1e-5, atol=1e-7)
    # ...and it is a different number from what each rank's own micro-batch balance gives
    local = [_layer("micro_batch")(_tokens(r))[1].lb_loss.detach() for r in (0, 1)]
    assert abs(float(sum(local)) / 2 - mean_loss) > 1e-3


def test_running_counts_cover_the_step_so_far_and_reset_at_the_next_step():
    sync = GlobalBatchCounts()
    assert torch.equal(sync(torch.tensor([1.0, 0.0, 3.0])), torch.tensor([1.0, 0.0, 3.0]))
    assert torch.equal(sync(torch.tensor([0.0, 2.0, 1.0])), torch.tensor([1.0, 2.0, 4.0]))
    sync.reset()
    assert torch.equal(sync(torch.tensor([0.0, 2.0, 1.0])), torch.tensor([0.0, 2.0, 1.0]))


def test_second_micro_batch_forms_f_from_both_micro_batches():
    layer = _layer("global_batch")
    a, b = _tokens(0), _tokens(1)
    layer(a)
    _, aux_b = layer(b)
    reference = _layer("micro_batch")
    routing_a = reference.route(a.reshape(-1, 8))
    routing_b = reference.route(b.reshape(-1, 8))
    counts = torch.bincount(torch.cat([routing_a.experts_Tk, routing_b.experts_Tk]).flatten(), minlength=6).float()
    f = counts / counts.sum()
    p_b = routing_b.stats.probs_TE.mean(dim=0)
    torch.testing.assert_close(aux_b.lb_loss, 6 * torch.dot(f, p_b))

"""Activation-driven conversions: the dense FFN's neurons carved into experts (or FFF leaves)
from how they fire on calibration tokens, with a router fitted in closed form (no gradient
training). Every conversion partitions the F hidden neurons, so the dense FFN is the sum of
the parts: these models combine the selected experts with unit weights (decision 25), and
with every routed expert selected they compute the dense FFN exactly.

    moefication  (Zhang et al., MoEfication) neurons clustered by co-activation (balanced
                 k-means on the |activation| patterns over calibration tokens); the router is a
                 ridge least-squares fit of x -> the norm of each expert's output, so the top-k
                 logits name the experts that contribute most to this token
    cmoe         (CMoE, carving) activation rates profiled (a neuron is active for a token when
                 it is among the token's largest |activations|); the highest-rate neurons form
                 the shared expert(s), the rest are clustered into routed experts by their
                 activation markers; each routed expert's router row is the activation-weighted
                 mean input of its tokens minus the mean input (a nearest-centroid rule), so the
                 router comes from the statistics without any fit
    fff          a depth-d tree: the neurons bisected recursively (balanced 2-means on
                 co-activation among the tokens that reach the node), each node neuron a ridge
                 least-squares fit of x -> (right half's output norm - left half's), so the
                 hard descent goes where more of the FFN's output is; 2^d leaves of F / 2^d

Shape legend: N calibration tokens, D model width, F dense hidden width, E experts, G = F / E
neurons per expert, S shared experts, L leaves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RIDGE = 1e-3  # ridge strength relative to the mean eigenvalue of X^T X: well-posed, barely biased
MIN_NODE_TOKENS = 16  # a node reached by fewer calibration tokens is fitted on all of them


def swiglu_hidden(x_ND: torch.Tensor, gate_FD: torch.Tensor, up_FD: torch.Tensor) -> torch.Tensor:
    """[N, F] hidden activations silu(x W_gate^T) * (x W_up^T) of the dense SwiGLU."""
    return F.silu(x_ND @ gate_FD.t()) * (x_ND @ up_FD.t())


def group_output_norms(h_NF: torch.Tensor, down_DF: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """[N, len(groups)] norm of each neuron group's share of the FFN output."""
    return torch.stack([(h_NF[:, g] @ down_DF[:, g].t()).norm(dim=1) for g in groups], dim=1)


def ridge_fit(x_ND: torch.Tensor, target_NK: torch.Tensor, bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [K, D], b [K]) minimising ||x W^T + b - target||^2 + ridge ||W||^2 (b = 0 unless `bias`)."""
    x = x_ND.double()
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    gram = x.t() @ x
    gram.diagonal().add_(RIDGE * gram.diagonal().mean().clamp_min(1e-12))
    solution = torch.linalg.solve(gram, x.t() @ target_NK.double())  # [D(+1), K]
    if bias:
        return solution[:-1].t().float(), solution[-1].float()
    return solution.t().float(), torch.zeros(target_NK.shape[1])


def balanced_kmeans(features: torch.Tensor, k: int, g: torch.Generator, iters: int = 20) -> torch.Tensor:
    """k equal-size clusters of the rows of `features` ([M, d], M divisible by k) by cosine
    distance: Lloyd's iterations with a balanced assignment step (rows taken greedily by
    distance into clusters with room). Returns [k, M / k] row indices, sorted within each cluster."""
    M = features.shape[0]
    size = M // k
    x = F.normalize(features.float(), dim=1)
    centers = x[torch.randperm(M, generator=g)[:k]].clone()
    assign = torch.zeros(M, dtype=torch.int64)
    for _ in range(iters):
        order = torch.argsort(torch.cdist(x, centers).flatten()).tolist()  # (row, cluster) pairs, nearest first
        room = [size] * k
        done = [False] * M
        for flat in order:
            row, cluster = divmod(flat, k)
            if not done[row] and room[cluster]:
                assign[row], done[row] = cluster, True
                room[cluster] -= 1
        new_centers = torch.stack([x[assign == c].mean(0) for c in range(k)])
        if torch.allclose(new_centers, centers):
            break
        centers = new_centers
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(k)])


# ---- moefication ------------------------------------------------------------------------------
def moefication(gate_FD, up_FD, down_DF, x_ND, num_experts: int, g: torch.Generator):
    """(groups [E, G], router [E, D])."""
    h_NF = swiglu_hidden(x_ND, gate_FD, up_FD)
    groups_EG = balanced_kmeans(h_NF.abs().t(), num_experts, g)
    scores_NE = group_output_norms(h_NF, down_DF, list(groups_EG))
    router_ED, _ = ridge_fit(x_ND, scores_NE)
    return groups_EG, router_ED


# ---- cmoe -------------------------------------------------------------------------------------
def activation_markers(h_NF: torch.Tensor, active_per_token: int) -> torch.Tensor:
    """[N, F] 1.0 where the neuron is among the token's `active_per_token` largest |activations|."""
    markers = torch.zeros_like(h_NF)
    return markers.scatter_(1, h_NF.abs().topk(active_per_token, dim=1).indices, 1.0)


def cmoe(gate_FD, up_FD, down_DF, x_ND, num_experts: int, num_shared: int, top_k: int, g: torch.Generator):
    """(shared neurons [S * G], routed groups [E, G], router [E, D]); G = F / (E + S)."""
    F_ = gate_FD.shape[0]
    G = F_ // (num_experts + num_shared)
    h_NF = swiglu_hidden(x_ND, gate_FD, up_FD)
    # as many active neurons per token as the converted layer will compute: shared + top-k experts
    markers_NF = activation_markers(h_NF, (num_shared + top_k) * G)
    rate_F = markers_NF.mean(0)
    by_rate = torch.argsort(rate_F, descending=True, stable=True)
    shared = torch.sort(by_rate[: num_shared * G]).values
    routed = torch.sort(by_rate[num_shared * G :]).values
    local_EG = balanced_kmeans(markers_NF[:, routed].t(), num_experts, g)
    groups_EG = routed[local_EG]
    # Router row e: the mean input of the tokens, each weighted by the share of expert e's
    # neurons it activates, minus the mean input; x . row is high where e's neurons fire (a
    # nearest-centroid rule from the activation statistics; no fit, no gradient).
    mass_NE = torch.stack([markers_NF[:, group].mean(1) for group in groups_EG], dim=1)
    router_ED = (mass_NE / mass_NE.sum(0).clamp_min(1e-12)).t() @ x_ND - x_ND.mean(0)
    return shared, groups_EG, router_ED


# ---- fff --------------------------------------------------------------------------------------
def fff_tree(gate_FD, up_FD, down_DF, x_ND, depth: int, g: torch.Generator):
    """(leaf neuron groups [L, F / L] in leaf order, node weights [2^d - 1, D], node biases)."""
    h_NF = swiglu_hidden(x_ND, gate_FD, up_FD)
    N, D = x_ND.shape
    nodes = 2**depth - 1
    weight_ND, bias_N = torch.zeros(nodes, D), torch.zeros(nodes)
    leaves: list[torch.Tensor] = [torch.empty(0)] * 2**depth

    def split(node: int, neurons: torch.Tensor, tokens: torch.Tensor, level: int) -> None:
        if level == depth:
            leaves[node - nodes] = torch.sort(neurons).values
            return
        fit_tokens = tokens if tokens.numel() >= MIN_NODE_TOKENS else torch.arange(N)
        halves = neurons[balanced_kmeans(h_NF[fit_tokens][:, neurons].abs().t(), 2, g)]
        norms_N2 = group_output_norms(h_NF[fit_tokens], down_DF, list(halves))
        w, b = ridge_fit(x_ND[fit_tokens], (norms_N2[:, 1] - norms_N2[:, 0])[:, None], bias=True)
        weight_ND[node], bias_N[node] = w[0], b[0]
        right = (x_ND[tokens] @ w[0] + b[0]) >= 0
        split(2 * node + 1, halves[0], tokens[~right], level + 1)
        split(2 * node + 2, halves[1], tokens[right], level + 1)

    split(0, torch.arange(gate_FD.shape[0]), torch.arange(N), 0)
    return torch.stack(leaves), weight_ND, bias_N

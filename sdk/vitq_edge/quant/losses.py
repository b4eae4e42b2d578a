"""The objectives the recipes optimise: Pearson similarity, ranking loss, attention-map KL."""

from __future__ import annotations

import torch


class PearsonTarget:
    """Mean over samples (dim 0) of the Pearson correlation with a fixed reference output.

    The reference is centred once: a search scores hundreds of candidates against it.
    """

    def __init__(self, reference: torch.Tensor) -> None:
        b = reference.reshape(reference.shape[0], -1).float()
        self.centred = b - b.mean(1, keepdim=True)
        self.norm = self.centred.norm(dim=1)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        a = output.reshape(output.shape[0], -1)
        a = a - a.mean(1, keepdim=True)
        return ((a * self.centred).sum(1) / (a.norm(dim=1) * self.norm).clamp_min(1e-30)).mean()


def pearson(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over samples (dim 0) of the Pearson correlation of the flattened outputs."""
    return PearsonTarget(reference)(output)


def pair_indices(n: int, max_pairs: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All (i, j) with i < j over n keys, or `max_pairs` of them drawn at random (fixed seed)."""
    i, j = torch.triu_indices(n, n, offset=1)
    if max_pairs is not None and len(i) > max_pairs:
        keep = torch.randperm(len(i), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        i, j = i[keep], j[keep]
    return i, j


class RankingTarget:
    """Liu et al.'s ranking-aware loss on attention scores [..., queries, keys], mean over pairs.

    For every row and key pair (i, j) with A_i != A_j, d = (Â_i - Â_j) * sign(A_i - A_j).
    The paper's hinge max(0, theta - d) is positive even for the float scores themselves
    whenever two keys are closer than theta, so it never vanishes; we charge it only to
    pairs whose order the quantized scores lost (d <= 0). The loss is therefore zero
    exactly when every pair keeps its order, and each flipped pair costs at least theta.
    Rows with N keys have N(N-1)/2 pairs; beyond `max_pairs` a fixed random subset is used.
    The reference's signs are computed once: a search scores hundreds of candidates.
    """

    def __init__(self, reference: torch.Tensor, theta: float = 0.2, max_pairs: int | None = 4096) -> None:
        self.i, self.j = pair_indices(reference.shape[-1], max_pairs)
        self.sign = torch.sign(reference[..., self.i] - reference[..., self.j])
        self.theta = theta

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        d = (scores[..., self.i] - scores[..., self.j]) * self.sign
        broken = (d <= 0) & (self.sign != 0)
        return torch.where(broken, self.theta - d, torch.zeros_like(d)).mean()


def ranking_loss(scores: torch.Tensor, reference: torch.Tensor, theta: float = 0.2,
                 max_pairs: int | None = 4096) -> torch.Tensor:
    """`RankingTarget(reference, theta, max_pairs)(scores)`."""
    return RankingTarget(reference, theta, max_pairs)(scores)


def attention_kl_target(reference: torch.Tensor, temperature: float = 4.0, dim: int = 1) -> torch.Tensor:
    """log softmax(ref / T) along `dim`: attention_kl's fixed side, computed once per unit."""
    return torch.log_softmax(reference / temperature, dim=dim)


def attention_kl(quantized: torch.Tensor, target: torch.Tensor, temperature: float = 4.0,
                 dim: int = 1) -> torch.Tensor:
    """KL(softmax(ref / T) || softmax(quant / T)) along `dim` of attention maps [B, H, N, N];
    `target` = attention_kl_target(ref, T, dim).

    ADFQ-ViT's code applies it to post-softmax maps over the heads axis (dim 1); dim -1
    compares each query's distribution over keys, as the paper's text describes.
    """
    log_q = torch.log_softmax(quantized / temperature, dim=dim)
    return (target.exp() * (target - log_q)).sum(dim).mean()

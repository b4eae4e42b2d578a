"""Top-k accuracy over a stream of logits."""

from __future__ import annotations

import torch


class TopK:
    def __init__(self, ks: tuple[int, ...] = (1, 5)):
        self.ks = ks
        self.correct = dict.fromkeys(ks, 0)
        self.n = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k_max = min(max(self.ks), logits.shape[-1])
        top = logits.topk(k_max, dim=-1).indices
        hits = top == labels[:, None]
        for k in self.ks:
            self.correct[k] += int(hits[:, :k].any(dim=-1).sum())
        self.n += labels.shape[0]

    def percent(self, k: int) -> float:
        return 100.0 * self.correct[k] / self.n if self.n else float("nan")

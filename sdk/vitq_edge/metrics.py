"""Accuracy measures: top-k over a stream of logits, and a build's summary of its three models."""

from __future__ import annotations

import math

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


def sqnr_db(logits: torch.Tensor, reference: torch.Tensor) -> float | None:
    """10 log10(reference power / error power); None when they are equal (infinite)."""
    err = float((logits.double() - reference.double()).pow(2).sum())
    return None if err == 0 else round(10 * math.log10(float(reference.double().pow(2).sum()) / err), 2)


def _share(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(100.0 * float((a.argmax(-1) == b.argmax(-1)).float().mean()), 2)


def accuracy_summary(fp32: torch.Tensor, simulated: torch.Tensor, pte: torch.Tensor, labels: torch.Tensor) -> dict:
    """What a build reports about its program, from the three models' logits on the same images.

    Top-1/top-5 of each; drop = float top-1 - simulated top-1; agreement = share of images whose
    simulated top-1 equals the float top-1; SQNR of the simulated logits against the float ones;
    and how often the program's top-1 equals the simulation's.
    """
    scores = {}
    for name, logits in (("fp32", fp32), ("simulated", simulated), ("pte_host", pte)):
        score = TopK()
        score.update(logits, labels)
        scores[name] = score
    acc = {k: round(s.percent(1), 2) for k, s in scores.items()}
    return {**acc, "top5": {k: round(s.percent(5), 2) for k, s in scores.items()},
            "drop": round(acc["fp32"] - acc["simulated"], 2), "agreement": _share(simulated, fp32),
            "sqnr_db": sqnr_db(simulated, fp32), "pte_agrees_with_simulated": _share(pte, simulated),
            "eval_images": int(labels.shape[0])}

"""Slow, sample-by-sample ports of the method's rules, written from docs/method.md, shared by the tests
that compare the vectorised code against them."""

from __future__ import annotations

import math

import torch


def adversarial_loss(z, ids, id_cams, pseudo, m, s=16.0, tau=0.2, eps=0.8) -> torch.Tensor:
    """The camera-agnostic adversarial loss (docs/method.md §5) of cosines ``z [B, N]`` in float64, one
    sample and one logit at a time, with the reference's margin fallback past pi; differentiable, so its
    gradients can be compared too."""
    z = z.double()
    total = 0.0
    for b in range(len(ids)):
        y = int(ids[b])
        positives = [y] + [n for n in range(len(id_cams))
                           if pseudo[y] >= 0 and pseudo[n] == pseudo[y] and id_cams[n] != id_cams[y]]
        logits = []
        for n in range(len(id_cams)):
            zn = z[b, n]
            if n == y:
                if zn > math.cos(math.pi - m):  # theta + m < pi
                    value = zn * math.cos(m) - torch.sqrt(1 - zn * zn) * math.sin(m)
                else:  # ArcFace's fallback
                    value = zn - m * math.sin(m)
            elif id_cams[n] == id_cams[y]:
                value = (1 + tau) * zn + tau
            else:
                value = zn
            logits.append(s * value)
        negatives = sum(torch.exp(logits[n]) for n in range(len(id_cams)) if n not in positives)
        for k in positives:
            q = eps / len(positives) + (1 - eps if k == y else 0.0)
            total = total - q * (logits[k] - torch.log(negatives + torch.exp(logits[k])))
    return total / len(ids)

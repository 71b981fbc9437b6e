"""The kNN-LM distribution from a search's neighbours (Khandelwal et al. 2020):

    p_knn(v) = sum over neighbours j with value v of softmax(-d / T)_j

over the valid neighbours only (id >= 0 and a finite distance: faiss pads a short result with -1).
Used by the kNN targets (memdec.pipeline.targets, sparse), the kNN-LM baseline (baselines.knnlm, dense)
and the speed benchmark (memdec.bench). Computed in the distances' dtype (float64 in, float64 out).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparseKNN(NamedTuple):
    """Per query: neighbour value tokens in ascending order (B, k) and, at the last entry of each token's run,
    that token's total probability; `mask` marks those entries (one per distinct valid token)."""

    tokens: torch.Tensor
    probs: torch.Tensor
    mask: torch.Tensor


SENTINEL = torch.iinfo(torch.int32).max  # the token of an invalid neighbour in SparseKNN.tokens


@torch.no_grad()
def neighbour_weights(distances: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(-d / T) over each row's valid neighbours (0 elsewhere), valid mask), both (n, k)."""
    ids = ids.to(distances.device)
    valid = (ids >= 0) & torch.isfinite(distances)
    logits = torch.where(valid, -distances / temperature, torch.full_like(distances, float("-inf")))
    p = torch.softmax(logits, dim=-1)
    return torch.where(valid, p, torch.zeros_like(p)), valid  # a row with no valid neighbour: all 0


@torch.no_grad()
def knn_distribution(distances: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, temperature: float,
                     vocab_size: int | None = None) -> torch.Tensor | SparseKNN:
    """p_knn of each query from its neighbours' distances (n, k) and datastore rows `ids` (n, k).

    `values` is the token of every datastore row. With `vocab_size`: the dense distribution
    (n, vocab_size); without: a SparseKNN (the same numbers at the neighbours' distinct tokens).
    A query with no valid neighbour gets all zeros.
    """
    p, valid = neighbour_weights(distances, ids, temperature)
    ids = ids.to(distances.device)
    values = values.to(distances.device)
    if vocab_size is not None:
        tokens = values[ids.clamp_min(0)].long()
        out = torch.zeros(len(p), vocab_size, dtype=p.dtype, device=p.device)
        return out.scatter_add_(1, tokens, p)
    tok = torch.where(valid, values[ids.clamp_min(0)].long(), torch.full_like(ids, SENTINEL, dtype=torch.long))
    tok, order = tok.sort(dim=1, stable=True)
    p = p.gather(1, order)
    new = torch.ones_like(tok, dtype=torch.bool)
    new[:, 1:] = tok[:, 1:] != tok[:, :-1]
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    cs = p.cumsum(1)
    before = torch.zeros_like(cs)
    before[:, 1:] = cs[:, :-1]
    # cumulative sum before the current run's start (cs is non-decreasing, so cummax finds it)
    start_cs = torch.where(new, before, torch.zeros_like(before)).cummax(1).values
    mask = last & (tok != SENTINEL)
    seg = torch.where(mask, cs - start_cs, torch.zeros_like(cs))
    return SparseKNN(tok, seg, mask)


@torch.no_grad()
def knn_target_probs(distances: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, targets: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """p_knn(target) of each query (n,), without a vocabulary-wide distribution."""
    p, _ = neighbour_weights(distances, ids, temperature)
    hit = values.to(p.device)[ids.to(p.device).clamp_min(0)] == targets.to(p.device)[:, None]
    return torch.where(hit, p, torch.zeros_like(p)).sum(-1)

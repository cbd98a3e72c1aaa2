"""Bit allocation under a budget, as pure arithmetic on probe results: which menu choice each layer takes.

Every function receives, per layer and menu choice, the stored bits (``costs``, from the bytes a probe's
quantized tensor really holds) and, where it optimises, the probed ΔKLD (``losses``), and returns one choice
index per layer. The total ΔKLD is taken as additive over layers; the validation run measures how wrong that
is.

``allocate`` solves the multiple-choice knapsack by the greedy on each layer's lower convex hull: every layer
starts at its cheapest choice, and the upgrade steps of all layers are taken in order of ΔKLD saved per bit
spent, each step that still fits the budget taken. On the hull a layer's steps come in falling order of
efficiency, so up to the first step that does not fit the greedy follows the LP relaxation's optimum; its loss
exceeds the true optimum by at most that step's saving. A choice off its layer's hull (costlier and not
better, or not worth its bits against its neighbours) is never taken.
"""

from __future__ import annotations

import numpy as np

from harness.errors import HarnessError


class BudgetError(HarnessError, ValueError):
    """A budget no allocation over the menu can meet."""


def cheapest_total(costs: np.ndarray) -> float:
    return float(costs.min(axis=1).sum())


def allocate(costs: np.ndarray, losses: np.ndarray, budget: float) -> np.ndarray:
    """Minimise Σ losses[i, c_i] subject to Σ costs[i, c_i] <= budget (the greedy of the module docstring)."""
    _check(costs, budget)
    hulls = [_lower_hull(cost, loss) for cost, loss in zip(costs, losses, strict=True)]
    steps = []  # (loss saved per bit, layer, position on its hull)
    for layer, hull in enumerate(hulls):
        for k in range(1, len(hull)):
            a, b = hull[k - 1], hull[k]
            saved = (losses[layer, a] - losses[layer, b]) / (costs[layer, b] - costs[layer, a])
            steps.append((-saved, layer, k))
    steps.sort()
    position = [0] * len(hulls)
    spent = float(sum(costs[i, h[0]] for i, h in enumerate(hulls)))
    for _, layer, k in steps:
        if position[layer] != k - 1:
            continue  # an earlier step of this layer did not fit
        hull = hulls[layer]
        extra = float(costs[layer, hull[k]] - costs[layer, hull[k - 1]])
        if spent + extra <= budget:
            position[layer] = k
            spent += extra
    return np.array([hull[p] for hull, p in zip(hulls, position, strict=True)])


def _lower_hull(costs: np.ndarray, losses: np.ndarray) -> list[int]:
    """Choice indices on the lower convex hull of (cost, loss), cheapest first, each strictly better."""
    order = sorted(range(len(costs)), key=lambda c: (costs[c], losses[c]))
    hull: list[int] = []
    for c in order:
        if hull and losses[c] >= losses[hull[-1]]:
            continue  # costs as much or more and is no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a–c
            if (losses[b] - losses[a]) * (costs[c] - costs[a]) >= (losses[c] - losses[a]) * (
                costs[b] - costs[a]
            ):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def use_more_bits(block: int, n_blocks: int) -> bool:
    """llama.cpp's k-quant rule: the first and last eighth of the blocks and every third block between."""
    eighth = n_blocks // 8
    return block < eighth or block >= 7 * n_blocks // 8 or (block - eighth) % 3 == 2


def more_bits_allocation(costs: np.ndarray, boosted: np.ndarray, budget: float) -> np.ndarray:
    """llama.cpp's heuristic at a budget: every layer at one choice, the ``boosted`` layers (attn_v and
    ffn_down of ``use_more_bits`` blocks) at the next costlier one; the costliest such pair that fits."""
    _check(costs, budget)
    order = np.argsort(costs.sum(axis=0), kind="stable")  # the menu, cheapest first
    best = np.full(len(costs), order[0])
    for rank, choice in enumerate(order):
        upper = order[min(rank + 1, len(order) - 1)]
        candidate = np.where(boosted, upper, choice)
        if costs[np.arange(len(costs)), candidate].sum() <= budget:
            best = candidate
    return best


def random_allocation(costs: np.ndarray, budget: float, seed: int) -> np.ndarray:
    """A random choice per layer, then random layers stepped down to their next cheaper choice until the
    budget holds: a random point near the budget, the baseline any method should beat."""
    _check(costs, budget)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(costs))
    chosen = rng.integers(0, costs.shape[1], len(costs))
    while costs[rows, chosen].sum() > budget:
        layer = int(rng.integers(len(costs)))
        cheaper = np.flatnonzero(costs[layer] < costs[layer, chosen[layer]])
        if cheaper.size:
            chosen[layer] = cheaper[np.argmax(costs[layer, cheaper])]
    return chosen


def _check(costs: np.ndarray, budget: float) -> None:
    if budget < cheapest_total(costs):
        raise BudgetError(
            f"the budget is below the cheapest allocation of the menu ({cheapest_total(costs):.0f} bits)"
        )

"""T-Tamer dynamic index (research/ttamer.md §2): backward induction over binned losses.

Nodes are explored in a fixed order (cheapest first). Each node j has its own sorted grid of
loss values `vals[j]` (already scaled by lambda) and the Markov state after exploring j is
the bin of j's loss. Transition kernels give the distribution of the next node's bin given
the last explored node's bin (the root is node -1 with one state, or several when the prompt
itself is binned). Costs are already scaled by (1 - lambda).

Two ways of keeping the incumbent X:
- ``recall=True``  (paper): X = min of the losses seen; stopping returns the argmin.
- ``recall=False`` (ablation / state-carried): X = the last loss; stopping returns the last.
  The fitted policies use this update with a *posterior* loss as the state, which already
  accounts for every answer seen (so recall lives in the state, not in a min over time).

`solve_skips` allows any later node (transitive closure of the line, §2.2); `solve_line`
is its special case with only j = i + 1; `multiline_choice` is the §2.3 rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STOP = -1
ROOT = -1


@dataclass(frozen=True)
class IndexSolution:
    """Backward-induction tables for one cascade and one lambda.

    `xgrid` is the sorted set of incumbent values (with +inf last, "nothing yet").
    `value[i + 1][s, x]` is the optimal cost-to-go with last explored node i (ROOT = -1) in
    state s and incumbent xgrid[x]; `action[i + 1][s, x]` is STOP or the next node;
    `sigma[i + 1][s]` is the dynamic index: with recall the policy continues iff X > sigma.
    """

    xgrid: np.ndarray
    value: list[np.ndarray]
    action: list[np.ndarray]
    sigma: list[np.ndarray]
    recall: bool

    @property
    def optimal_value(self) -> float:
        """E[lambda * loss + (1 - lambda) * cost] of the optimal policy from the root."""
        return float(self.value[0][0, -1])

    def x_index(self, x: float) -> int:
        """Position of incumbent value x on the grid (x must be a grid value or inf)."""
        k = int(np.searchsorted(self.xgrid, x))
        return min(k, len(self.xgrid) - 1)


def _successors(i: int, n: int, skips: bool) -> range:
    return range(i + 1, n) if skips else range(i + 1, min(i + 2, n))


def solve_skips(
    vals: Sequence[np.ndarray],
    kernels: dict[tuple[int, int], np.ndarray],
    costs: Sequence[float],
    *,
    recall: bool = True,
    skips: bool = True,
) -> IndexSolution:
    """Solve the cascade DP by backward induction over (last node, its bin, incumbent X).

    `kernels[(i, j)][s, r]` = P(bin r of node j | bin s of node i) for i < j, with i = ROOT
    for the first explored node (its rows are the root states). Missing pairs are not
    allowed transitions. Cost O(n^2 * B^2 * |X|).
    """
    vals = [np.asarray(v, dtype=float) for v in vals]
    base = {float(x) for v in vals for x in v}
    solution = _backward(vals, kernels, costs, np.array([*sorted(base), np.inf]), recall, skips)
    # Phi has kinks at later nodes' indices, which are not loss values: add them to the
    # grid until no new one appears, so the interpolated sigma is exact (needed by §2.3).
    for _ in range(len(vals)):
        extra = {float(x) for sig in solution.sigma for x in sig if np.isfinite(x)} - base
        if not extra:
            break
        base |= extra
        grid = np.array([*sorted(base), np.inf])
        solution = _backward(vals, kernels, costs, grid, recall, skips)
    return solution


def _backward(
    vals: list[np.ndarray],
    kernels: dict[tuple[int, int], np.ndarray],
    costs: Sequence[float],
    xgrid: np.ndarray,
    recall: bool,
    skips: bool,
) -> IndexSolution:
    n = len(vals)
    nx = len(xgrid)
    # position on the grid of min(x, v) / v for every node bin: precomputed once
    value: list[np.ndarray] = [np.empty(0)] * (n + 1)
    action: list[np.ndarray] = [np.empty(0)] * (n + 1)
    sigma: list[np.ndarray] = [np.empty(0)] * (n + 1)
    x_of = {j: np.searchsorted(xgrid, vals[j]) for j in range(n)}
    for i in range(n - 1, ROOT - 1, -1):
        n_states = len(vals[i]) if i >= 0 else _root_states(kernels, n)
        cont = np.full((n_states, nx), np.inf)  # best "pay and open a next node" value
        act = np.full((n_states, nx), STOP, dtype=int)
        for j in _successors(i, n, skips):
            kernel = kernels.get((i, j))
            if kernel is None:
                continue
            phi_next = value[j + 1]  # (B_j, nx)
            b_j = len(vals[j])
            # incumbent after observing bin r of j, for every current incumbent x
            if recall:
                nxt = np.minimum(np.arange(nx)[None, :], x_of[j][:, None])  # (B_j, nx)
            else:
                nxt = np.broadcast_to(x_of[j][:, None], (b_j, nx))
            cont_r = phi_next[np.arange(b_j)[:, None], nxt]  # (B_j, nx)
            w = costs[j] + kernel @ cont_r  # (n_states, nx)
            better = w < cont - 1e-15
            cont = np.where(better, w, cont)
            act = np.where(better, j, act)
        stop_now = xgrid[None, :] <= cont + 1e-15
        value[i + 1] = np.where(stop_now, xgrid[None, :], cont)
        action[i + 1] = np.where(stop_now, STOP, act)
        sigma[i + 1] = _index(xgrid, cont)
    return IndexSolution(xgrid=xgrid, value=value, action=action, sigma=sigma, recall=recall)


def _root_states(kernels: dict[tuple[int, int], np.ndarray], n: int) -> int:
    for j in range(n):
        if (ROOT, j) in kernels:
            return kernels[(ROOT, j)].shape[0]
    raise ValueError("no transition leaves the root")


def _index(xgrid: np.ndarray, cont: np.ndarray) -> np.ndarray:
    """sigma[s]: the smallest root of g(X) = X - W(X) (Def. 4.4), W = best continuation.

    g is non-decreasing (Phi is 1-Lipschitz in X). Between grid points the root is
    interpolated linearly; past the largest finite grid value W is constant, so the root
    there is W itself. With recall the stop region is {X <= sigma} (Thm 4.5).
    """
    finite = np.isfinite(xgrid)
    xs = xgrid[finite]
    out = np.full(cont.shape[0], np.inf)
    for s in range(cont.shape[0]):
        w = cont[s]
        if not np.isfinite(w).any():  # no successor: stopping is the only move
            continue
        g = xs - w[finite]
        above = np.flatnonzero(g > 1e-15)
        if len(above) == 0:  # stop at every finite grid value: root beyond the grid
            out[s] = max(xs[-1], w[-1]) if len(xs) else w[-1]
        elif above[0] == 0:  # continue everywhere on the grid: root below it
            out[s] = min(xs[0], w[0])
        else:
            k = above[0]
            g0, g1 = g[k - 1], g[k]
            out[s] = xs[k - 1] + (xs[k] - xs[k - 1]) * (-g0) / (g1 - g0)
    return out


def solve_line(
    vals: Sequence[np.ndarray],
    p1: np.ndarray,
    transitions: Sequence[np.ndarray],
    costs: Sequence[float],
    *,
    recall: bool = True,
) -> IndexSolution:
    """§2.1: a line 0 -> 1 -> ... -> n-1 without skips.

    `p1` is the distribution over node 0's bins; `transitions[j][s, r]` = P(bin r of node
    j+1 | bin s of node j).
    """
    kernels = {(ROOT, 0): np.asarray(p1, dtype=float)[None, :]}
    for j, t in enumerate(transitions):
        kernels[(j, j + 1)] = np.asarray(t, dtype=float)
    return solve_skips(vals, kernels, costs, recall=recall, skips=False)


def line_sigma(solution: IndexSolution, last: int, state: int) -> float:
    """The dynamic index of the line whose last explored node is `last` in `state`."""
    return float(solution.sigma[last + 1][state])


def multiline_choice(x: float, sigmas: Sequence[float]) -> int:
    """§2.3: stop (STOP) if X <= min sigma over lines, else advance the argmin line."""
    if not len(sigmas):
        return STOP
    k = int(np.argmin(sigmas))
    return STOP if x <= sigmas[k] else k

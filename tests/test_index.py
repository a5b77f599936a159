"""The T-Tamer index against brute-force dynamic programming, and the §3 lower bound."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from policies.index import ROOT, STOP, multiline_choice, solve_line, solve_skips


def random_instance(rng: np.random.Generator, n: int, skips: bool):
    """Random per-node bin grids, root distributions and kernels (every i < j if skips)."""
    vals = [np.sort(rng.uniform(0.0, 1.0, size=rng.integers(2, 4))) for _ in range(n)]
    costs = rng.uniform(0.0, 0.25, size=n)
    kernels = {}
    for j in range(n):
        kernels[(ROOT, j)] = rng.dirichlet(np.ones(len(vals[j])))[None, :]
        for i in range(j):
            if skips or i == j - 1:
                kernels[(i, j)] = rng.dirichlet(np.ones(len(vals[j])), size=len(vals[i]))
    if not skips:
        for j in range(1, n):
            kernels.pop((ROOT, j))
    return vals, kernels, costs


def brute_force(vals, kernels, costs, recall: bool) -> float:
    """Optimal expected loss+cost by exhaustive recursion over the full history."""
    n = len(vals)

    @functools.cache
    def phi(last: int, state: int, x: float) -> float:
        best = x
        for j in range(last + 1, n):
            kern = kernels.get((last, j))
            if kern is None:
                continue
            total = costs[j]
            for r, p in enumerate(kern[state]):
                v = vals[j][r]
                total += p * phi(j, r, min(x, v) if recall else v)
            best = min(best, total)
        return best

    return phi(ROOT, 0, math.inf)


def policy_value(sol, vals, kernels, costs) -> float:
    """Expected objective of following the solution's action table (not its values)."""
    n = len(vals)

    def go(last: int, state: int, x: float) -> float:
        act = sol.action[last + 1][state, sol.x_index(x)]
        if act == STOP:
            return x
        j = int(act)
        return costs[j] + sum(
            p * go(j, r, min(x, vals[j][r]) if sol.recall else vals[j][r])
            for r, p in enumerate(kernels[(last, j)][state])
        )

    assert n > 0
    return go(ROOT, 0, math.inf)


@pytest.mark.parametrize("skips", [False, True])
@pytest.mark.parametrize("recall", [True, False])
def test_dp_matches_brute_force_on_random_instances(skips: bool, recall: bool) -> None:
    rng = np.random.default_rng(7 + 2 * skips + recall)
    for _ in range(40):
        n = int(rng.integers(1, 5))
        vals, kernels, costs = random_instance(rng, n, skips)
        sol = solve_skips(vals, kernels, costs, recall=recall, skips=skips)
        expected = brute_force(vals, kernels, costs, recall)
        assert sol.optimal_value == pytest.approx(expected, abs=1e-9)
        assert policy_value(sol, vals, kernels, costs) == pytest.approx(expected, abs=1e-9)


def test_index_rule_continue_iff_x_above_sigma_is_optimal_on_a_line() -> None:
    """Thm 4.5: with recall the stop set at every state is {X <= sigma(state)}."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        n = int(rng.integers(1, 5))
        vals, kernels, costs = random_instance(rng, n, skips=False)
        sol = solve_skips(vals, kernels, costs, recall=True, skips=False)
        for last in range(ROOT, n):
            for s in range(sol.action[last + 1].shape[0]):
                stops = sol.action[last + 1][s] == STOP
                rule = sol.xgrid <= sol.sigma[last + 1][s] + 1e-12
                assert (stops == rule).all()


def test_skips_never_worse_than_line_and_contain_every_single_model() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        vals, kernels, costs = random_instance(rng, 4, skips=True)
        line = {k: v for k, v in kernels.items() if k[0] == k[1] - 1}
        with_skips = solve_skips(vals, kernels, costs).optimal_value
        assert with_skips <= solve_skips(vals, line, costs, skips=False).optimal_value + 1e-12
        for j in range(4):  # root -> j -> stop is one policy among those with skips
            single = costs[j] + float(kernels[(ROOT, j)][0] @ vals[j])
            assert with_skips <= single + 1e-12


def test_solve_line_is_the_no_skip_case() -> None:
    rng = np.random.default_rng(5)
    vals, kernels, costs = random_instance(rng, 3, skips=False)
    sol = solve_line(vals, kernels[(ROOT, 0)][0], [kernels[(0, 1)], kernels[(1, 2)]], costs)
    assert sol.optimal_value == pytest.approx(brute_force(vals, kernels, costs, True))


@pytest.mark.parametrize("alpha", [2.0, 5.0, 20.0])
def test_no_recall_lower_bound_instance_of_section_3(alpha: float) -> None:
    """R1 = 1/a^2; R2 = 0 w.p. 1 - 1/a, 1/a w.p. 1/a; free exploration. Ratio = a."""
    vals = [np.array([1 / alpha**2]), np.array([0.0, 1 / alpha])]
    p1 = np.array([1.0])
    kern = np.array([[1 - 1 / alpha, 1 / alpha]])
    with_recall = solve_line(vals, p1, [kern], [0.0, 0.0], recall=True).optimal_value
    no_recall = solve_line(vals, p1, [kern], [0.0, 0.0], recall=False).optimal_value
    assert with_recall == pytest.approx(1 / alpha**3)  # = OPT = E[min(R1, R2)]
    assert no_recall == pytest.approx(1 / alpha**2)
    assert no_recall / with_recall == pytest.approx(alpha)


def _multiline_values(lines: list) -> tuple[float, float]:
    """(value of following the §2.3 rule, brute-force optimum over the joint state)."""

    @functools.cache
    def joint(frontier: tuple, x: float) -> float:
        best = x
        for k, (vals, kernels, costs, _) in enumerate(lines):
            last, s = frontier[k]
            if last + 1 >= len(vals):
                continue
            j = last + 1
            tot = costs[j]
            for r, p in enumerate(kernels[(last, j)][s]):
                nf = list(frontier)
                nf[k] = (j, r)
                tot += p * joint(tuple(nf), min(x, vals[j][r]))
            best = min(best, tot)
        return best

    def follow(frontier: tuple, x: float) -> float:
        sig = [
            (sol.sigma[f[0] + 1][f[1]] if f[0] + 1 < len(vals) else np.inf)
            for (vals, _, _, sol), f in zip(lines, frontier, strict=True)
        ]
        k = multiline_choice(x, sig)
        if k == STOP:
            return x
        vals, kernels, costs, _ = lines[k]
        last, s = frontier[k]
        j = last + 1
        tot = costs[j]
        for r, p in enumerate(kernels[(last, j)][s]):
            nf = list(frontier)
            nf[k] = (j, r)
            tot += p * follow(tuple(nf), min(x, vals[j][r]))
        return tot

    start = tuple((ROOT, 0) for _ in lines)
    return follow(start, math.inf), joint(start, math.inf)


def test_multiline_rule_matches_joint_brute_force() -> None:
    """§2.3: advance the line with the lowest index; stop when X <= every index."""
    rng = np.random.default_rng(13)
    for _ in range(15):
        lines = []
        for _ in range(int(rng.integers(2, 4))):
            n = int(rng.integers(1, 3))
            vals, kernels, costs = random_instance(rng, n, skips=False)
            lines.append((vals, kernels, costs, solve_skips(vals, kernels, costs, skips=False)))
        rule, optimum = _multiline_values(lines)
        assert rule == pytest.approx(optimum, abs=1e-9)

"""Accuracy-cost curve metrics on small point sets whose answers are computed by hand."""

from __future__ import annotations

import math

import pytest

from calibration.metrics import (
    CurvePoint,
    accuracy_at,
    area_under,
    cost_to_reach,
    curve_stats,
    oracle_savings,
    pareto_envelope,
)

# A and B are the envelope; C is beaten by the cheaper A, D ties B's cost with less accuracy,
# E costs more than B for the same accuracy, F and G are not finite and must be ignored.
A = CurvePoint(knob=1.0, accuracy=0.5, cost=0.2)
B = CurvePoint(knob=2.0, accuracy=0.8, cost=0.5)
C = CurvePoint(knob=3.0, accuracy=0.4, cost=0.4)
D = CurvePoint(knob=4.0, accuracy=0.7, cost=0.5)
E = CurvePoint(knob=5.0, accuracy=0.8, cost=1.0)
F = CurvePoint(knob=6.0, accuracy=float("nan"), cost=0.1)
G = CurvePoint(knob=7.0, accuracy=0.99, cost=float("inf"))
POINTS = [E, D, C, B, A, F, G]  # deliberately unsorted
ENV = [A, B]  # knots of the curve: (0, 0), (0.2, 0.5), (0.5, 0.8), flat after


def test_envelope_keeps_only_undominated_points_by_increasing_cost() -> None:
    assert pareto_envelope(POINTS) == ENV


def test_envelope_of_equal_costs_keeps_the_most_accurate() -> None:
    low = CurvePoint(0.0, 0.6, 0.3)
    high = CurvePoint(1.0, 0.7, 0.3)
    assert pareto_envelope([low, high]) == [high]
    assert pareto_envelope([high, low]) == [high]


def test_envelope_drops_a_costlier_point_that_is_not_strictly_better() -> None:
    cheap = CurvePoint(0.0, 0.6, 0.1)
    same = CurvePoint(1.0, 0.6, 0.9)
    worse = CurvePoint(2.0, 0.55, 0.95)
    better = CurvePoint(3.0, 0.61, 1.2)
    assert pareto_envelope([better, worse, same, cheap]) == [cheap, better]


def test_envelope_of_nothing_is_empty() -> None:
    assert pareto_envelope([]) == []
    assert pareto_envelope([F, G]) == []


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        (0.0, 0.0),  # anchored at (0, 0)
        (0.1, 0.25),  # halfway from the anchor to A
        (0.2, 0.5),  # on A
        (0.35, 0.65),  # halfway from A to B
        (0.5, 0.8),  # on B
        (0.75, 0.8),  # flat after the last point
        (3.0, 0.8),
    ],
)
def test_accuracy_at_interpolates_from_the_origin_and_is_flat_after(cost, expected) -> None:
    assert accuracy_at(ENV, cost) == pytest.approx(expected, abs=1e-12)


def test_a_free_point_replaces_the_anchor() -> None:
    free = [CurvePoint(0.0, 0.3, 0.0), CurvePoint(1.0, 0.9, 1.0)]
    assert accuracy_at(free, 0.0) == pytest.approx(0.3)
    assert accuracy_at(free, 0.5) == pytest.approx(0.6)
    assert cost_to_reach(free, 0.2) == 0.0  # reached for free
    assert cost_to_reach(free, 0.3) == 0.0
    assert cost_to_reach(free, 0.6) == pytest.approx(0.5)
    assert area_under(free) == pytest.approx((0.3 + 0.9) / 2)


@pytest.mark.parametrize(
    ("accuracy", "expected"),
    [
        (0.0, 0.0),
        (0.25, 0.1),  # inside the anchor -> A segment
        (0.5, 0.2),  # exactly A
        (0.65, 0.35),  # inside the A -> B segment
        (0.79, 0.2 + 0.3 * 0.29 / 0.3),  # 0.49
        (0.8, 0.5),  # exactly B: its cost, not E's
    ],
)
def test_cost_to_reach_interpolates_inside_a_segment(accuracy, expected) -> None:
    got = cost_to_reach(ENV, accuracy)
    assert got is not None
    assert got == pytest.approx(expected, abs=1e-12)


def test_cost_to_reach_is_none_when_never_reached() -> None:
    assert cost_to_reach(ENV, 0.81) is None
    assert cost_to_reach(ENV, 1.0) is None
    assert cost_to_reach([], 0.1) is None


def test_cost_to_reach_inverts_accuracy_at_on_the_rising_part() -> None:
    for target in (0.05, 0.3, 0.55, 0.7, 0.8):
        cost = cost_to_reach(ENV, target)
        assert cost is not None
        assert accuracy_at(ENV, cost) == pytest.approx(target, abs=1e-12)


def test_area_under_a_known_polyline() -> None:
    # trapezoids: 0-0.2: (0 + 0.5) / 2 * 0.2 = 0.05; 0.2-0.5: (0.5 + 0.8) / 2 * 0.3 = 0.195;
    # 0.5-1.0 flat at 0.8: 0.4. Total 0.645 over a width of 1.
    assert area_under(ENV) == pytest.approx(0.645, abs=1e-12)


def test_area_under_a_shorter_range_is_normalised_by_its_width() -> None:
    # 0-0.2: 0.05; 0.2-0.35: (0.5 + 0.65) / 2 * 0.15 = 0.08625; divided by 0.35
    assert area_under(ENV, upto=0.35) == pytest.approx(0.13625 / 0.35, abs=1e-12)
    # past the last point the curve is flat: 0-2 = 0.645 - 0 + 0.8 * 1.0 (1.0-2.0), over 2
    assert area_under(ENV, upto=2.0) == pytest.approx((0.645 + 0.8) / 2.0, abs=1e-12)


def test_area_under_the_perfect_and_the_empty_curve() -> None:
    assert area_under([CurvePoint(0.0, 1.0, 0.0)]) == pytest.approx(1.0)
    assert area_under([]) == 0.0
    assert accuracy_at([], 0.5) == 0.0


def test_curve_stats_reads_every_number_off_the_envelope() -> None:
    stats = curve_stats(POINTS, best_accuracy=0.8)
    assert stats["curve"] == [
        {"knob": 1.0, "accuracy": 0.5, "cost": 0.2},
        {"knob": 2.0, "accuracy": 0.8, "cost": 0.5},
    ]
    assert stats["cost_to_match"] == pytest.approx(0.5)
    assert stats["cost_to_match_1pp"] == pytest.approx(0.49)
    assert stats["acc_at_20"] == pytest.approx(0.5)
    assert stats["acc_at_50"] == pytest.approx(0.8)
    assert stats["auc"] == pytest.approx(0.645)


def test_curve_stats_says_none_where_the_best_model_is_never_matched() -> None:
    stats = curve_stats(POINTS, best_accuracy=0.9)
    assert stats["cost_to_match"] is None
    assert stats["cost_to_match_1pp"] is None  # 0.89 > 0.8 too
    stats = curve_stats(POINTS, best_accuracy=0.805)
    assert stats["cost_to_match"] is None
    assert stats["cost_to_match_1pp"] == pytest.approx(0.2 + 0.3 * 0.295 / 0.3)


def test_oracle_savings_arithmetic() -> None:
    oracle = {"curve": [{"knob": 0.0, "accuracy": 0.95, "cost": 0.3}]}
    policy = {"cost_to_match": 0.5, "cost_to_match_1pp": 0.44}
    got = oracle_savings(policy, oracle)
    assert got["oracle_cost"] == 0.3
    assert got["at_match"] == pytest.approx(0.5 / 0.7)  # saves 0.5 of the oracle's 0.7
    assert got["at_1pp"] == pytest.approx(0.56 / 0.7)


def test_oracle_savings_reads_the_oracles_last_curve_point() -> None:
    oracle = {
        "curve": [
            {"knob": 0.0, "accuracy": 0.5, "cost": 0.1},
            {"knob": 1.0, "accuracy": 0.9, "cost": 0.6},
        ]
    }
    got = oracle_savings({"cost_to_match": 0.8, "cost_to_match_1pp": 0.6}, oracle)
    assert got["oracle_cost"] == 0.6
    assert got["at_match"] == pytest.approx(0.2 / 0.4)
    assert got["at_1pp"] == pytest.approx(1.0)  # as cheap as the oracle: all of its savings


def test_oracle_savings_is_none_where_undefined() -> None:
    oracle = {"curve": [{"knob": 0.0, "accuracy": 0.95, "cost": 0.3}]}
    got = oracle_savings({"cost_to_match": None, "cost_to_match_1pp": 0.65}, oracle)
    assert got["at_match"] is None
    assert got["at_1pp"] == pytest.approx(0.5)
    empty = oracle_savings({"cost_to_match": 0.5, "cost_to_match_1pp": 0.4}, {"curve": []})
    assert empty == {"oracle_cost": None, "at_match": None, "at_1pp": None}
    no_savings = {"curve": [{"knob": 0.0, "accuracy": 0.95, "cost": 1.0}]}
    got = oracle_savings({"cost_to_match": 0.5, "cost_to_match_1pp": 0.4}, no_savings)
    assert got["at_match"] is None and got["at_1pp"] is None
    assert not math.isnan(got["oracle_cost"])


def test_a_swept_oracle_is_costed_where_it_reaches_the_best_single_model() -> None:
    """A graded oracle is a curve: its cost is where it first reaches `at_accuracy`."""
    oracle = {
        "curve": [
            {"knob": 9.0, "accuracy": 0.5, "cost": 0.1},
            {"knob": 0.0, "accuracy": 0.9, "cost": 0.6},
        ]
    }
    policy = {"cost_to_match": 0.8, "cost_to_match_1pp": 0.6}
    got = oracle_savings(policy, oracle, at_accuracy=0.7)
    assert got["oracle_cost"] == pytest.approx(0.35)  # halfway between the two points
    assert got["at_match"] == pytest.approx(0.2 / 0.65)
    assert oracle_savings(policy, oracle)["oracle_cost"] == 0.6  # one point: the last

"""The policy artifact is one typed class with one loader: older artifacts load and decide
as they did, the content hash is unchanged, and a malformed field is refused by its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibration.artifact import load_artifact, save_artifact
from calibration.evaluate import evaluate_artifact
from calibration.pricing import fill_costs
from calibration.traces import load_traces
from policies.artifact import ArtifactError, PolicyArtifact, content_hash, parse_artifact
from proxy import demo
from tests.synthetic import write_choice_pair

DATA = Path(__file__).parent / "data"
# fitted by `cascade fit` of main at d6ecf0b, before the artifact was typed (tests/data/README.md)
DEMO_FIXTURE = DATA / "policy-main-d6ecf0b.json"
TIERS_FIXTURE = DATA / "policy-main-d6ecf0b-tiers.json"


def _report(path: Path) -> dict:
    report = json.loads(path.with_suffix(".evaluate.json").read_text())
    report["label"] = "correct"  # written before labels: an older artifact scores `correct`
    report.pop("traces")  # where the test file was, not what it held
    return report


def test_an_artifact_fitted_before_the_typed_class_loads_and_evaluates_as_then() -> None:
    art = load_artifact(DEMO_FIXTURE)
    assert art.hash == json.loads(DEMO_FIXTURE.read_text())["hash"] == content_hash(art.data)
    assert art.models == [demo.SMALL, demo.LARGE] and art.reference_model == demo.LARGE
    report = evaluate_artifact(art, fill_costs(load_traces(demo.TEST)))
    report.pop("traces")
    assert report == _report(DEMO_FIXTURE)  # the same figures, to the last bit


def test_an_older_tier_artifact_loads_and_evaluates_as_then(tmp_path: Path) -> None:
    """The tiers fixture was fitted on tests/synthetic.py's pair, written again here (the
    same seeds give the same rows)."""
    art = load_artifact(TIERS_FIXTURE)
    assert art.models[0] == "tier:tiny+small+medium"
    assert art.threshold and art.agreement  # its baseline settings, typed
    test = write_choice_pair(tmp_path)[1]
    report = evaluate_artifact(art, load_traces(test))
    report.pop("traces")
    assert report == _report(TIERS_FIXTURE)


def test_saving_a_loaded_artifact_keeps_its_hash_and_its_bytes(tmp_path: Path) -> None:
    art = load_artifact(DEMO_FIXTURE)
    path = tmp_path / "again.json"
    save_artifact(art, path)
    assert path.read_text() == DEMO_FIXTURE.read_text()
    assert load_artifact(path).hash == art.hash


def _edited(edit) -> str:
    """The demo fixture with `edit` applied and its hash recomputed: only the shape is wrong."""
    art = json.loads(DEMO_FIXTURE.read_text())
    edit(art)
    art["hash"] = content_hash(art)
    return json.dumps(art)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a["nodes"][1].update(cost_usd="x"), "nodes[1].cost_usd: expected a number"),
        (lambda a: a["nodes"][0].pop("model"), "nodes[0].model: missing"),
        (
            lambda a: a["length_calibration"][1].update(weights=3),
            "length_calibration[1].weights: expected a list, got int",
        ),
        (lambda a: a["posterior"].pop("bias"), "posterior.bias: missing"),
        (
            lambda a: a.update(label="graded"),
            "label: expected 'correct' or 'quality', got 'graded'",
        ),
        (lambda a: a.update(recall="yes"), "recall: expected true or false, got str"),
        (
            lambda a: a["tables"]["decision"][1].__setitem__(0, "stop"),
            "tables.decision[1][0]: expected an integer, got str",
        ),
        (
            lambda a: a["tables"]["edges"].pop(),
            "tables.edges: expected 2 entries (one per node), got 1",
        ),
        (
            lambda a: a["sweep"][0]["decision"].pop(),
            "sweep[0].decision: expected 3 entries (the start and each node), got 2",
        ),
        (
            lambda a: a["baselines"]["threshold"][0]["thresholds"].__setitem__(0, "sometimes"),
            "baselines.threshold[0].thresholds[0]: expected a number, got str",
        ),
        (lambda a: a["difficulty"].update(dim=7), "difficulty.dim: expected"),
        (
            lambda a: a["tables"]["decision"][0].__setitem__(0, 2),
            "tables.decision[0][0]: expected -1 (stop) to 1, got 2",
        ),
        (
            lambda a: a["baselines"]["agreement"][0].update(tiers=[[]]),
            "baselines.agreement[0].tiers: expected non-empty tiers",
        ),
        (
            lambda a: a.update(agreement="fuzzy"),
            "agreement: expected one of ['exact', 'graded'], got 'fuzzy'",
        ),
        (lambda a: a.update(agreement=None), "agreement: expected one of"),
    ],
    ids=[
        "cost",
        "model",
        "calibrator",
        "posterior",
        "label",
        "recall",
        "decision",
        "edges",
        "sweep",
        "threshold",
        "dim",
        "move",
        "tiers",
        "agreement",
        "agreement-null",
    ],
)
def test_a_malformed_field_is_refused_by_its_key(edit, message: str) -> None:
    with pytest.raises(ArtifactError) as err:
        parse_artifact(_edited(edit), "policy.json")
    assert f"policy artifact policy.json: {message}" in str(err.value)


def test_the_agreement_mode_is_exact_when_absent_and_read_when_graded() -> None:
    """Artifacts written before graded agreement vote by exact answer classes; "graded"
    gives a policy whose step needs the answers' agreement."""
    exact = parse_artifact(DEMO_FIXTURE.read_text(), "policy.json")
    assert "agreement" not in exact.data
    assert exact.agreement_mode == "exact" and not exact.policy().graded
    graded = parse_artifact(_edited(lambda a: a.update(agreement="graded")), "policy.json")
    assert graded.agreement_mode == "graded" and graded.policy().graded
    with pytest.raises(ValueError, match="needs the answers' agreement"):
        graded.policy().step([0], ["42", None], [-0.1, None])


def test_the_loader_checks_the_hash_before_the_shape() -> None:
    art = json.loads(DEMO_FIXTURE.read_text())
    art["nodes"][1]["cost_usd"] = "x"  # edited, not re-hashed
    with pytest.raises(ArtifactError, match="does not match its hash"):
        parse_artifact(json.dumps(art), "policy.json")


def test_an_artifact_built_in_memory_is_checked_like_a_file() -> None:
    data = json.loads(DEMO_FIXTURE.read_text())
    assert PolicyArtifact.from_dict(data).hash == data["hash"]
    data["nodes"] = []
    data["hash"] = content_hash(data)
    with pytest.raises(ArtifactError, match="nodes: expected at least one node"):
        PolicyArtifact.from_dict(data, "built")

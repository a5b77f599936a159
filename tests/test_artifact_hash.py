"""The policy artifact's hash identifies its content: the same fit of the same data gives the
same hash whenever it runs, artifacts hashed by the older rule still load, and an edit to
either kind is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from calibration.artifact import build_artifact, load_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.traces import load_traces
from policies.artifact import ArtifactError, parse_artifact


@pytest.fixture(scope="module")
def train(synthetic: tuple[Path, Path]):
    return load_traces(synthetic[0])


def _fit(train) -> dict:
    """The artifact's JSON object, as `cascade fit` writes it."""
    fitted = FittedIndex(train, recall=True)
    return build_artifact(fitted, DEFAULT_MUS[12], train_path="synthetic-train.jsonl").data


@pytest.fixture(scope="module")
def artifact(train) -> dict:
    return _fit(train)


def _old_rule(art: dict) -> dict:
    """`art` as the artifacts written before hash_rule existed: schema first, and a hash of
    everything but the hash, `created` included (the old rule, computed here on its own)."""
    old = {"schema": art["schema"], "hash": ""}
    old.update({k: v for k, v in art.items() if k not in ("schema", "hash", "hash_rule")})
    body = {k: v for k, v in old.items() if k != "hash"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    old["hash"] = "sha256:" + hashlib.sha256(blob).hexdigest()
    return old


def test_two_fits_of_the_same_data_at_different_times_have_one_hash(train, artifact, tmp_path):
    again = _fit(train)  # a second, independent fit
    again["created"] = "2001-02-03T04:05:06+00:00"  # written at another time
    assert again["hash"] == artifact["hash"]
    path = tmp_path / "again.json"
    path.write_text(json.dumps(again, indent=1))
    assert load_artifact(path).hash == artifact["hash"]  # and it still verifies
    assert next(iter(json.loads(path.read_text()))) == "hash"  # the first key of the file


def test_an_artifact_hashed_by_the_old_rule_still_loads(artifact, tmp_path) -> None:
    old = _old_rule(artifact)
    assert "hash_rule" not in old and old["hash"] != artifact["hash"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old, indent=1))
    assert load_artifact(path).hash == old["hash"]


@pytest.mark.parametrize(
    ("edit", "kind"),
    [
        (lambda a: a.update({"lambda": 0.123}), "new"),
        (lambda a: a.update({"lambda": 0.123}), "old"),
        (lambda a: a.update({"created": "2001-02-03T04:05:06+00:00"}), "old"),  # hashed then
        (lambda a: a.pop("hash_rule"), "new"),  # a new artifact cannot pass as an old one
        (lambda a: a["nodes"][0].update({"cost_usd": 0.0}), "new"),
    ],
    ids=["new-lambda", "old-lambda", "old-created", "new-rule-removed", "new-node-cost"],
)
def test_an_edited_artifact_of_either_rule_is_refused(artifact, edit, kind) -> None:
    art = json.loads(json.dumps(artifact if kind == "new" else _old_rule(artifact)))
    parse_artifact(json.dumps(art), "unedited.json")  # passes before the edit
    edit(art)
    with pytest.raises(ArtifactError, match="does not match its hash"):
        parse_artifact(json.dumps(art), "edited.json")


def test_an_unknown_hash_rule_is_named(artifact) -> None:
    art = {**artifact, "hash_rule": "content/v9"}
    with pytest.raises(ArtifactError, match=r"edited\.json: unknown hash_rule 'content/v9'"):
        parse_artifact(json.dumps(art), "edited.json")

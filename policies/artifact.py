"""The policy artifact's format: schema version, content hash and required fields (pure).

`calibration/artifact.py` writes artifacts; the proxy and `cascade evaluate` read them and
check them here, so a missing, edited or foreign file is refused with a precise message.
"""

from __future__ import annotations

import hashlib
import json

from policies.errors import InvalidInput

SCHEMA = "cascade.policy/v1"
# How `hash` is computed. Artifacts without this field were hashed over everything but the
# hash, `created` included, so refitting the same data gave a new hash every time; they are
# still verified that way. Since content/v2 the hash leaves `created` out: same fit, same hash.
HASH_RULE = "content/v2"
LEGACY_HASH_RULE = "all-but-hash/v1"  # implied when `hash_rule` is absent
_LEFT_OUT = {HASH_RULE: ("hash", "created"), LEGACY_HASH_RULE: ("hash",)}
REQUIRED = (
    "schema",
    "hash",
    "nodes",
    "posterior",
    "tables",
    "recall",
    "lambda",
    "training",
    "expected",
)


class ArtifactError(InvalidInput):
    """A policy artifact is missing, unreadable, or not one this version can use."""


def content_hash(art: dict) -> str:
    """sha256 of the canonical JSON of the artifact, by the rule it names in `hash_rule`:
    everything but `hash` and `created` (content/v2), or, for artifacts written before that
    field existed, everything but `hash`."""
    rule = art.get("hash_rule", LEGACY_HASH_RULE)
    if not isinstance(rule, str) or rule not in _LEFT_OUT:
        raise ArtifactError(f"unknown hash_rule {rule!r} (this version knows {HASH_RULE!r})")
    body = {k: v for k, v in art.items() if k not in _LEFT_OUT[rule]}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def parse_artifact(text: str, source: str) -> dict:
    """The artifact in `text` (read from `source`), checked: JSON, schema, fields, hash."""
    try:
        art = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"policy artifact {source} is not valid JSON: {exc}") from None
    if not isinstance(art, dict):
        raise ArtifactError(f"policy artifact {source}: expected a JSON object")
    if art.get("schema") != SCHEMA:
        raise ArtifactError(
            f"policy artifact {source}: schema {art.get('schema')!r}, expected {SCHEMA!r}"
        )
    missing = [k for k in REQUIRED if k not in art]
    if missing:
        raise ArtifactError(f"policy artifact {source}: missing field(s) {missing}")
    try:
        expected = content_hash(art)
    except ArtifactError as exc:
        raise ArtifactError(f"policy artifact {source}: {exc}") from None
    if expected != art["hash"]:
        raise ArtifactError(f"policy artifact {source}: content does not match its hash (edited?)")
    return art

"""The policy artifact's format: schema version, content hash and required fields (pure).

`calibration/artifact.py` writes artifacts; the proxy and `cascade evaluate` read them and
check them here, so a missing, edited or foreign file is refused with a precise message.
"""

from __future__ import annotations

import hashlib
import json

SCHEMA = "cascade.policy/v1"
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


class ArtifactError(ValueError):
    """A policy artifact is missing, unreadable, or not one this version can use."""


def content_hash(art: dict) -> str:
    """sha256 of the canonical JSON of everything except the hash itself."""
    body = {k: v for k, v in art.items() if k != "hash"}
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
    if content_hash(art) != art["hash"]:
        raise ArtifactError(f"policy artifact {source}: content does not match its hash (edited?)")
    return art

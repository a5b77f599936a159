"""Every error cascade raises on purpose, as one tree (the bottom room, so every room can
raise them; the HTTP layer maps them to OpenAI errors in one place, proxy/http/errors.py, and
the command line to `error: ...` and exit 2 in one place, cli/main.py):

    CascadeError                      anything cascade refuses or cannot do, with a message
    ├── InvalidInput                  the user's input is wrong: fix it and try again
    │   ├── TraceError                a trace file (policies/traceformat.py)
    │   ├── ArtifactError             a policy artifact (policies/artifact.py)
    │   ├── TransitionError           a transitions spec (policies/transitions.py)
    │   ├── PricingError              a model without a known price (upstreams/pricing.py)
    │   ├── ConfigError               the proxy's configuration (proxy/config.py)
    │   ├── OverrideError             a request's `cascade` object (proxy/engine/cascade.py)
    │   ├── ReloadError               an artifact that cannot be (re)loaded (proxy/engine)
    │   ├── ReportError, RetentionError  report and prune options (proxy/ledger)
    │   └── CollectError, GraderError, PairError  collect and bench input (calibration)
    └── LedgerError                   the ledger database (proxy/ledger/db.py)
        ├── SchemaError               missing, behind or unknown schema: run `cascade db upgrade`
        └── DatabaseUnavailable       the database cannot be reached

InvalidInput is also a ValueError, so code that catches ValueError around parsing keeps
working; nothing outside this tree is caught as the user's fault: an unexpected exception
is a bug and surfaces as one (a 500 with a request id, a traceback on the command line).
"""

from __future__ import annotations


class CascadeError(Exception):
    """Base of every error cascade raises on purpose; its message is meant for the user."""


class InvalidInput(CascadeError, ValueError):
    """The input (a file, an option, a request field, a configuration key) is wrong; the
    message names what and where. Nothing was written."""


class LedgerError(CascadeError):
    """The ledger database cannot be used as asked."""

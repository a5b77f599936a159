"""The cost ledger: one row per request and per upstream call, plus daily rollups.

Typical wiring in the proxy::

    from proxy.ledger import LedgerWriter, RequestRecord, CallRecord, check_schema

    check_schema(url)                      # raises SchemaError: "run `cascade db upgrade`"
    writer = LedgerWriter(url, spool_path).start()
    writer.submit(RequestRecord(...))      # from the event loop; never blocks
    await writer.aclose()                  # at shutdown (SIGTERM)

The writer in parts: ``writer`` (the queue and its thread: batching, outages, replay,
close), ``dialect`` (records to rows, statements, the write transaction), ``spool`` (the
local file records wait in, its slots and orphans), ``deadline`` (database calls that must
answer in time).
"""

from proxy.ledger.db import (
    DatabaseUnavailable,
    SchemaError,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from proxy.ledger.records import CallRecord, RequestRecord, key_id
from proxy.ledger.writer import LedgerWriter

__all__ = [
    "CallRecord",
    "DatabaseUnavailable",
    "LedgerWriter",
    "RequestRecord",
    "SchemaError",
    "check_schema",
    "current_revision",
    "downgrade",
    "head_revision",
    "key_id",
    "make_engine",
    "upgrade",
]

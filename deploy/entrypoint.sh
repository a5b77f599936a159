#!/bin/sh
# Create or migrate the ledger schema, then serve (serve refuses an outdated schema).
# Extra arguments are passed to `cascade serve`.
set -eu

cascade db upgrade
exec cascade serve --host 0.0.0.0 --port 8080 "$@"

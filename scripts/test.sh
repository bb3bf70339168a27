#!/usr/bin/env bash
# Sets up everything, then runs the whole test suite (unit, integration with real peers, e2e).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export TCP_NODELAY=1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "test: no tests ran - that is a failure here" >&2; exit 1; fi
exit $rc

#!/usr/bin/env bash
# Sets up (or reuses) the virtual environment and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$VSPARSE_PYTHON" -m pytest -q "$@"

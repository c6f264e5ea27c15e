#!/usr/bin/env bash
# Sets up (or reuses) the virtual environment and runs the quickstart: a small diffusers Wan video DiT compiled
# with backend="vsparse", a few denoising steps with classifier-free guidance, then the report.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$VSPARSE_PYTHON" examples/quickstart.py "$@"

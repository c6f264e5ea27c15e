#!/usr/bin/env bash
# Creates or reuses the project's virtual environment and installs what it needs. Sourced by the other scripts;
# prints the interpreter's path on its last line when run directly.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VSPARSE_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# Reinstall only when what decides the install changed.
want="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$venv/.vsparse-installed" 2>/dev/null)" != "$want" ]; then
  "$py" -m pip install -q --disable-pip-version-check --upgrade pip setuptools
  # torch first and pinned: an unpinned requirement would pull a several-GB CUDA build on a CPU machine.
  "$py" -m pip install -q --disable-pip-version-check torch==2.13.0
  # The triton that torch 2.13 names; on CPU it runs our kernels under TRITON_INTERPRET=1.
  "$py" -m pip install -q --disable-pip-version-check triton==3.7.1
  "$py" -m pip install -q --disable-pip-version-check -e "$root[test,plot]"
  echo "$want" > "$venv/.vsparse-installed"
fi
VSPARSE_PYTHON="$py"
if [ "${BASH_SOURCE[0]}" = "$0" ]; then echo "$py"; fi

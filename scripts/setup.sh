#!/usr/bin/env bash
# Create the virtual environment (if needed) and install csc with its test extras into it.
# torch stays at the version already installed (a GPU build, say); where there is none it is
# pinned to 2.13.0, because an unpinned torch requirement downloads several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VIRTUAL_ENV:-${CSC_VENV:-.venv}}
DEFAULT_TORCH=2.13.0

torch_version() {  # the torch version installed for interpreter $1, without its +local label
  "$1" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' 2>/dev/null || true
}

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "csc needs Python >= 3.11; set PYTHON=/path/to/python3.11 and run again" >&2
    exit 1
  fi
  flags=()
  # A torch already installed for this interpreter is kept by letting the environment see it.
  [ -n "$(torch_version "$PYTHON")" ] && flags+=(--system-site-packages)
  echo "creating virtual environment $VENV"
  "$PYTHON" -m venv "${flags[@]}" "$VENV"
fi

torch=$(torch_version "$VENV/bin/python")
torch=${torch:-$DEFAULT_TORCH}
stamp="$VENV/.csc-installed"
wanted="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16) torch==$torch"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "installing csc and its test extras into $VENV (torch==$torch)"
  printf 'torch==%s\n' "$torch" >"$VENV/torch-constraint.txt"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -c "$VENV/torch-constraint.txt" -e ".[test]"
  echo "$wanted" >"$stamp"
fi

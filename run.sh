#!/usr/bin/env bash
# SpecMesh set-up and entry points. The first call creates .venv and installs everything; later
# calls reuse it (re-installing only when pyproject.toml changed).
#   ./run.sh demo            the main job: bundled pair, local Ray actors, speed and bytes vs plain decoding
#   ./run.sh test [ARGS]     the whole test suite (pytest ARGS)
#   ./run.sh [ARGS]          any `specmesh` command, e.g. ./run.sh run --help
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $VENV (once) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # torch first and pinned: the CPU build (an unpinned torch pulls several GB of CUDA build).
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec python -m pytest "$@" ;;
  demo) exec specmesh demo "$@" ;;
  *) exec specmesh "$cmd" "$@" ;;
esac

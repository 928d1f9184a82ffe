#!/usr/bin/env bash
# The demo on a fresh machine: makes its own environment (.venv-demo), installs this package with the jax
# extra (no CUDA toolkit, compiler or ninja needed), then trains a small RWKV6 language model whose time-mixing
# calls RWKVKernelOperator (about 3 minutes on 2 CPU cores), generates text with the carried state and checks
# stepwise generation against the full-sequence forward.
#   bash scripts/demo.sh                       # the default run
#   bash scripts/demo.sh --epochs 30           # a longer run; any `demo` option goes through (see --help)
#   KERAS_BACKEND=torch bash scripts/demo.sh   # another backend: installs that extra instead
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-demo}
PYTHON=${PYTHON:-python3}
BACKEND=${KERAS_BACKEND:-jax}
[ "$BACKEND" = pytorch ] && BACKEND=torch
case "$BACKEND" in
  jax|torch|tensorflow) ;;
  *) echo "KERAS_BACKEND must be jax, torch (pytorch) or tensorflow; got '$BACKEND'" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing rwkv6-keras-operator[$BACKEND] into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch: pin the version whose CPU wheel this project's machines carry (elsewhere pip picks the default build)
EXTRA_PINS=()
[ "$BACKEND" = torch ] && EXTRA_PINS=("torch==2.13.0")
"$VENV/bin/python" -m pip install -q "${EXTRA_PINS[@]}" -e ".[$BACKEND]"
echo "== python -m rwkv6_keras_operator demo $* (KERAS_BACKEND=$BACKEND)"
KERAS_BACKEND=$BACKEND exec "$VENV/bin/python" -m rwkv6_keras_operator demo "$@"

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: makes its own environment (.venv-test), then runs the tests once
# per Keras backend (jax, torch, tensorflow). Exit status 0 only if every backend passes.
#   bash scripts/test.sh                 # everything
#   BACKENDS="torch" bash scripts/test.sh -k state   # a subset; extra arguments go to pytest
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-test}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV" || exit 1
fi
echo "== installing test dependencies into $VENV"
# torch==2.13.0: a CPU wheel (on this project's machines it is on local disk; plain `torch` would pull a CUDA
# build of several GB). triton: the interpreter runs the GPU kernels on CPU tensors. jax: newest for this
# Python (0.10.2 on Python 3.11). matplotlib: the bench command's plot is tested too. rwkv: BlinkDL's official
# runtime, the oracle of tests/models (pure Python on torch); safetensors: the models' second checkpoint format.
"$VENV/bin/python" -m pip install -q --upgrade pip || exit 1
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "triton>=3.2" "jax[cpu]" "tensorflow-cpu>=2.16" \
  "keras>=3.6" "pytest>=8" pytest-xdist ml_dtypes matplotlib "rwkv==0.8.32" safetensors -e . || exit 1
# (versions from package metadata: importing jaxlib's Triton lowering and triton in one process aborts)
"$VENV/bin/python" -c "from importlib.metadata import version as v; print(' | '.join(f'{p} {v(p)}' for p in ('jax', 'torch', 'tensorflow-cpu', 'keras', 'triton')))"

status=0
summary=()
run() {  # run NAME ENV... -- PYTEST-ARGS...
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo; echo "== $name"
  local start=$SECONDS
  env "${envs[@]}" TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
  local rc=$?
  summary+=("$(printf '%-36s %s (%ds)' "$name" "$([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)")" $((SECONDS - start)))")
  [ $rc -eq 0 ] || status=1
}
for backend in ${BACKENDS:-jax torch tensorflow}; do
  case $backend in
    # torch: the Triton kernels run under the interpreter on CPU tensors (tests/engines/triton).
    torch) run "torch (Triton interpreter on CPU)" KERAS_BACKEND=torch TRITON_INTERPRET=1 -- tests "$@" ;;
    *) run "$backend" KERAS_BACKEND=$backend -- tests "$@" ;;
  esac
done
echo; echo "== summary"; printf '%s\n' "${summary[@]}"
exit $status

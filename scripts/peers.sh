#!/usr/bin/env bash
# The pinned peers of the GPU benchmarks (and keras, for a GPU machine that lacks it) as wheels, in two steps, so
# that a GPU machine without internet can run them:
#
#   bash scripts/peers.sh download       # where PyPI is reachable: the wheels into .peers/wheels/ (git-ignored)
#   bash scripts/peers.sh install        # where the benchmark runs: from .peers/wheels/ with no index (or, with
#                                        # no wheels there, straight from PyPI), into isolated target folders
#   eval "$(bash scripts/peers.sh env)"  # this shell: keras on PYTHONPATH if it was installed, PEER_PYTHONPATH
#
# - .peers/keras: keras 3.15.1, namex, optree, and the model tests' oracle and reader (rwkv 0.8.32, safetensors);
#   installed only if this python3 cannot import keras or rwkv. Keras's other dependencies (numpy, absl-py, rich,
#   h5py, ml-dtypes, packaging) are expected on the machine.
# - .peers/site: fla-core 0.6.0, rwkv6-keras-operator 1.0.5 and rwkv-ops 0.11.3, OFF the default import path:
#   1.0.5 has this project's import name. The benchmarks put it first on the path of the peers' own processes
#   only (PEER_PYTHONPATH). 1.0.5 and rwkv-ops abort a process that loads both: one of them a process.
# The wheels are downloaded for the GPU machines (Python 3.12, manylinux x86_64); PEERS_PYTHON=3.11 (say) for
# another Python. bash scripts/gpu.sh runs `install` and `env` itself. PEERS_DIR moves .peers elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${PEERS_DIR:-$PWD/.peers}
KERAS=(keras==3.15.1 namex==0.1.0 optree==0.20.0 rwkv==0.8.32 safetensors==0.8.0)
PEERS=(fla-core==0.6.0 rwkv6-keras-operator==1.0.5 rwkv-ops==0.11.3)
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore

download() {  # download GROUP SPECS...
  local dest=$DIR/wheels/$1; shift
  mkdir -p "$dest"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${PEERS_PYTHON:-3.12}" --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$@"
}

install() {  # install GROUP SPECS...: from the downloaded wheels if there are any, else from the index
  local group=$1; shift
  local wheels=$DIR/wheels/$group target=$DIR/$group
  local stamp=$target/.installed
  local source=(--retries 1 --timeout 30 "$@")   # no wheels and no internet: fail soon
  if compgen -G "$wheels/*.whl" >/dev/null; then
    source=(--no-index "$wheels"/*.whl)
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${source[*]}" ]; then
    echo "peers.sh: $target is up to date"
    return
  fi
  rm -rf "$target"
  "$PY" -m pip install -q --no-deps --no-compile --no-cache-dir --target "$target" "${source[@]}"
  echo "${source[*]}" > "$stamp"
  echo "peers.sh: installed into $target:" "$(cd "$target" && ls -d -- *.dist-info | sed 's/.dist-info$//' | paste -sd ' ')"
}

case ${1:-} in
  download)
    download keras "${KERAS[@]}"
    download site "${PEERS[@]}"
    du -sh "$DIR/wheels"
    echo "peers.sh: next, on the GPU machine (with .peers/wheels carried there): bash scripts/peers.sh install" ;;
  install)
    if "$PY" -c "import keras, rwkv, safetensors" 2>/dev/null && [ ! -d "$DIR/keras" ]; then
      echo "peers.sh: keras, rwkv and safetensors are importable here; not installing them"
    else
      install keras "${KERAS[@]}"
    fi
    install site "${PEERS[@]}" ;;
  env)
    keras_path=""
    [ -d "$DIR/keras" ] && keras_path=$DIR/keras
    [ -n "$keras_path" ] && echo "export PYTHONPATH=\"$keras_path\${PYTHONPATH:+:\$PYTHONPATH}\""
    echo "export PEER_PYTHONPATH=\"$DIR/site${keras_path:+:$keras_path}\"" ;;
  *)
    echo "usage: bash scripts/peers.sh download | install | env" >&2
    exit 2 ;;
esac

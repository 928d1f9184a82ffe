#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel (python -m build: the wheel is built from the sdist),
# install the wheel (not editable) with jax (CPU) into a fresh venv, then run, from outside the source tree,
# the console script's `check` and a few tests that need the package data. A file missing from the sdist or the
# wheel (the demo corpus, py.typed) fails here.
#   bash scripts/test_wheel.sh          # what .ci/run does after scripts/test.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
BUILD_VENV=$ROOT/.venv-build      # the build front end only; kept between runs
VENV=$ROOT/.venv-wheel            # made afresh every run
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
fail() { echo "test_wheel.sh: FAIL: $*" >&2; exit 1; }

echo "== building the sdist and the wheel"
[ -x "$BUILD_VENV/bin/python" ] || "$PYTHON" -m venv "$BUILD_VENV" || fail "venv $BUILD_VENV"
"$BUILD_VENV/bin/python" -m pip install -q build || fail "pip install build"
# from a copy of the files git tracks or would (no build leftovers: a stale *.egg-info/SOURCES.txt would put files
# into the sdist that the configuration leaves out)
mkdir "$WORK/src" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$WORK/src" \
  || fail "copy of the sources"
"$BUILD_VENV/bin/python" -m build -q --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; fail "python -m build"; }
wheel=$(ls "$WORK"/dist/*.whl) && sdist=$(ls "$WORK"/dist/*.tar.gz) || fail "no wheel or sdist built"
echo "$(basename "$sdist") $(basename "$wheel")"
# the wheel's file list, then its entry points
listing=$("$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
print("\n".join(wheel.namelist()))
print(*(wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")), sep="\n")
EOF
) || fail "reading $wheel"
for f in rwkv6_keras_operator/demo/corpus.txt rwkv6_keras_operator/py.typed LICENSE; do   # what a user needs
  grep -qx "\(.*\.dist-info/licenses/\)\?$f" <<<"$listing" || fail "$f is not in the wheel"
done
grep -qx 'rwkv6-keras-operator = rwkv6_keras_operator.cli:main' <<<"$listing" \
  || fail "no console script rwkv6-keras-operator in the wheel"

echo "== installing the wheel with jax (CPU) into a fresh $VENV ($((SECONDS - start))s so far)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || fail "venv $VENV"
# --no-compile: byte-compiling all of jax and keras would take most of this step; imports compile what they use
"$VENV/bin/python" -m pip install -q --no-compile "$wheel[jax,test]" || fail "pip install the wheel"

# From a folder without the sources: the tests, pyproject.toml's pytest settings and a root conftest.py, if any.
cp -r tests pyproject.toml "$WORK"/ && { [ ! -f conftest.py ] || cp conftest.py "$WORK"/; }
cd "$WORK" || fail "cd $WORK"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2
location=$("$VENV/bin/python" -c "import rwkv6_keras_operator as p; print(p.__file__)") || fail "import"
case $location in
  "$VENV"/*) echo "imported from $location" ;;
  *) fail "rwkv6_keras_operator imported from $location, not from the installed wheel" ;;
esac
"$VENV/bin/python" -m rwkv6_keras_operator --version || fail "python -m rwkv6_keras_operator"
echo "== rwkv6-keras-operator check, the installed console script ($((SECONDS - start))s so far)"
"$VENV/bin/rwkv6-keras-operator" check --backends jax --seed 0 || fail "rwkv6-keras-operator check"
echo "== tests against the installed wheel ($((SECONDS - start))s so far)"
# the shipped corpus (package data) and a model saved and loaded through the registered layer
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --disable-warnings tests/test_layer.py tests/demo/test_demo.py \
  -k "save_load_model_round_trip or shipped_corpus" || fail "tests against the wheel"
echo "test_wheel.sh: PASS ($((SECONDS - start))s)"

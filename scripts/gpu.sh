#!/usr/bin/env bash
# One call on a GPU machine: check the GPU engines against the float64 oracle, then time them with the peers in the
# same run. Nothing is built: Triton (torch) and Pallas (jaxlib) compile the kernels at first use.
#
#   bash scripts/gpu.sh tests    # the whole torch suite (Triton engine) and the whole jax suite (Pallas engine)
#   bash scripts/gpu.sh bench    # benchmarks/gpu_jax.py: Pallas, then the Triton engine, rwkv-ops and fla, same run
#   bash scripts/gpu.sh compare  # benchmarks/peers/compare.py: this project, fla, rwkv-ops and 1.0.5, each through
#                                # its public API, one process each
#   bash scripts/gpu.sh multi    # 2+ GPUs: benchmarks/ddp_torch.py (torch DDP), benchmarks/shard_jax.py (or: ddp, shard)
#   bash scripts/gpu.sh seqpar   # 2+ GPUs: benchmarks/sequence_parallel.py, one sequence cut along T (torch NCCL, jax)
#   bash scripts/gpu.sh serving  # benchmarks/serving.py: decode through the operator, B=4096 against copy, the pool
#   bash scripts/gpu.sh models   # benchmarks/models_e2e.py: the RWKV-6 169M model, training step and generation
#   bash scripts/gpu.sh varlen   # benchmarks/varlen.py: packed sequences (cu_seqlens) vs fixed length and fla
#   bash scripts/gpu.sh bwd_split  # the split Triton backward (Settings.backward_split) and the level table
#                                  # (Settings.mask_table): their tests compiled, then benchmarks/backward_split.py
#                                  # (fused against split, with and without the table, each kernel alone)
#   bash scripts/gpu.sh tests multi bench                                      # stages run in the order given
#
# The peers (and keras, where the machine lacks it) come from scripts/peers.sh: `bash scripts/peers.sh download`
# where PyPI is reachable puts their pinned wheels in .peers/wheels/; this script installs them from there (with no
# index; or from PyPI where there are no wheels) into .peers/, the peers off the default import path. Caches that
# are not writable (Triton fails without one) are moved to /tmp. Each step logs to NAME.log and writes its files
# under NAME/; all of it comes back packed in $OUT/results.tgz (OUT default /tmp/gpu-out). Each step has its own
# time limit, so that one slow step cannot take the others' results with it. fla autotunes its kernels on first use
# (minutes): the tuned choices (Triton's *.autotune.json) are packed into autotune.tgz, and a later call that finds
# .tcache/autotune.tgz restores them, so fla is timed with its own tuned kernels without tuning again.
set -u
OUT=${OUT:-/tmp/gpu-out}
LOGS=/tmp/gpu-logs   # everything the steps write; packed into $OUT/results.tgz at the end, step logs also copied
mkdir -p "$OUT" "$LOGS"
trap 'tar -czf "$OUT/results.tgz" -C "$LOGS" . && cp "$LOGS"/*.log "$OUT"/ 2>/dev/null' EXIT
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
writable() { mkdir -p "$1" 2>/dev/null && touch "$1/.writable" 2>/dev/null && rm -f "$1/.writable"; }
home=${HOME:-/nonexistent}
if ! writable "${TRITON_CACHE_DIR:-$home/.triton/cache}" || ! writable "${XDG_CACHE_HOME:-$home/.cache}"; then
  export HOME=/tmp/home TRITON_CACHE_DIR=/tmp/triton-cache TORCH_EXTENSIONS_DIR=/tmp/torch-ext XDG_CACHE_HOME=/tmp/xdg
  mkdir -p "$HOME" "$TRITON_CACHE_DIR" "$TORCH_EXTENSIONS_DIR" "$XDG_CACHE_HOME"
  echo "caches moved to /tmp (the default ones are not writable)"
fi
bash scripts/peers.sh install ||
  echo "WARNING: scripts/peers.sh install failed: no peers (bash scripts/peers.sh download, where PyPI is reachable)"
eval "$(bash scripts/peers.sh env)"
CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
mkdir -p "$CACHE"
[ -f .tcache/autotune.tgz ] && tar -xzf .tcache/autotune.tgz -C "$CACHE" && echo "restored fla's autotune choices"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print the log's tail
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  mkdir -p "$LOGS/$name"
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" env OUT="$LOGS/$name" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  tail -n "${TAIL:-15}" "$LOGS/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}
pack_autotune() {
  (cd "$CACHE" && find . -name '*.autotune.json' | tar -czf "$LOGS/autotune.tgz" -T -) && \
    echo "packed $(tar -tzf "$LOGS/autotune.tgz" | wc -l) autotune choices"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
GPUS=$(nvidia-smi -L | wc -l)
TESTS_TORCH=(env KERAS_BACKEND=torch python3 -m pytest tests -q -n 12 -p no:cacheprovider -rs)
TESTS_JAX=(env KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest tests -q -n 8 -p no:cacheprovider -rs)
for stage in "$@"; do
  case $stage in
    tests)   # with 2+ GPUs the two suites run side by side, one GPU each (tests only: benchmarks run alone)
      if [ "$GPUS" -ge 2 ]; then
        CUDA_VISIBLE_DEVICES=0 step tests_torch "${TESTS_LIMIT:-300}" "${TESTS_TORCH[@]}" & torch_pid=$!
        CUDA_VISIBLE_DEVICES=1 step tests_jax "${TESTS_LIMIT:-300}" "${TESTS_JAX[@]}" & jax_pid=$!
        wait $torch_pid || status=1
        wait $jax_pid || status=1
      else
        step tests_torch "${TESTS_LIMIT:-300}" "${TESTS_TORCH[@]}"
        step tests_jax "${TESTS_LIMIT:-300}" "${TESTS_JAX[@]}"
      fi ;;
    bench)   # Pallas, this project's Triton engine, rwkv-ops and fla, one after the other in one run (GPU 0)
      step bench "${BENCH_LIMIT:-560}" env CUDA_VISIBLE_DEVICES=0 KERAS_BACKEND=jax \
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 BUDGET=$(( ${BENCH_LIMIT:-560} - 20 )) python3 benchmarks/gpu_jax.py
      pack_autotune ;;
    compare) step compare "${COMPARE_LIMIT:-560}" env CUDA_VISIBLE_DEVICES=0 BUDGET=$(( ${COMPARE_LIMIT:-560} - 20 )) \
        python3 benchmarks/peers/compare.py
      pack_autotune ;;
    serving)   # one process per backend (GPU 0); fla from $PEER_PYTHONPATH in the torch one
      step serving_torch "${SERVING_LIMIT:-400}" env CUDA_VISIBLE_DEVICES=0 \
        python3 benchmarks/serving.py --backend torch --variants
      step serving_jax "${SERVING_LIMIT:-400}" env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 \
        python3 benchmarks/serving.py --backend jax --variants ;;
    models)    # torch + operator, torch + fla chunk_rwkv6, jax + operator: one process each (GPU 0)
      step models_e2e "${MODELS_LIMIT:-560}" env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 \
        python3 benchmarks/models_e2e.py --timeout $(( (${MODELS_LIMIT:-560} - 20) / 3 ))
      pack_autotune ;;
    varlen)    # packed sequences: one process per backend (GPU 0; VARLEN_BACKENDS, default both); fla's chunk_rwkv6
               # from $PEER_PYTHONPATH in torch's
      for backend in ${VARLEN_BACKENDS:-torch jax}; do
        step varlen_$backend "${VARLEN_LIMIT:-400}" env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 \
          python3 benchmarks/varlen.py --backend $backend
      done
      pack_autotune ;;
    bwd_split)   # tests compiled on GPU 0, then the timings alone
      step bwd_split_tests "${TESTS_LIMIT:-300}" env CUDA_VISIBLE_DEVICES=0 KERAS_BACKEND=torch python3 -m pytest \
        tests/engines/triton/test_backward_split.py tests/engines/triton/test_mask_table.py \
        tests/engines/triton/test_kernels.py -q -p no:cacheprovider -rs
      step bwd_split "${BENCH_LIMIT:-560}" env CUDA_VISIBLE_DEVICES=0 KERAS_BACKEND=torch python3 benchmarks/backward_split.py ;;
    ddp) step ddp_torch "${DDP_LIMIT:-200}" env KERAS_BACKEND=torch python3 benchmarks/ddp_torch.py ;;
    shard) step shard_jax "${SHARD_LIMIT:-300}" env KERAS_BACKEND=jax python3 benchmarks/shard_jax.py ;;
    seqpar)   # torch (NCCL, one process a GPU), then jax (a mesh of every GPU); each against one GPU
      step seqpar_torch "${SEQPAR_LIMIT:-280}" python3 benchmarks/sequence_parallel.py --backend torch
      step seqpar_jax "${SEQPAR_LIMIT:-280}" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        python3 benchmarks/sequence_parallel.py --backend jax ;;
    multi)
      step ddp_torch "${DDP_LIMIT:-200}" env KERAS_BACKEND=torch python3 benchmarks/ddp_torch.py
      step shard_jax "${SHARD_LIMIT:-300}" env KERAS_BACKEND=jax python3 benchmarks/shard_jax.py ;;
    *) echo "usage: bash scripts/gpu.sh STAGE... (tests, bench, compare, serving, models, varlen, bwd_split, seqpar, multi = ddp + shard)" >&2; exit 2 ;;
  esac
done
exit $status

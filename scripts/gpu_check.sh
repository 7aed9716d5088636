#!/usr/bin/env bash
# Staged, budgeted GPU check (`make gpu-check`): every stage appends to $GPU_RESULTS as it
# goes, so a run cut off by its time limit still returns what it measured.
#   1. build rcl_ops._C for this GPU's architecture only, with parallel jobs
#   2. only the tests that touch CUDA or compiled Triton (marker "gpu"), per-test timeout,
#      no stop at the first failure, JUnit XML
#   3. the headline benchmark case (B=64, 3x128x128; CUDA events; peak memory) and the
#      host-overhead case
#   4. the scaling sweep, only with GPU_CHECK_FULL=1
#   5. torch.profiler kernel tables of the headline loss steps (what bounds each)
# Before the stages, the peers' wheels in $PEER_WHEELS (default .peer-wheels, from
# `make peer-wheels`) are installed into a temporary folder on PYTHONPATH, if there are any.
# GPU_CHECK_STAGES="1 2 3" picks stages (the build is skipped only if you leave out 1 and
# the extension is already built).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${GPU_RESULTS:-gpu-check-results}
STAGES=${GPU_CHECK_STAGES:-"1 2 3 5"}
[ "${GPU_CHECK_FULL:-0}" = 1 ] && STAGES="$STAGES 4"
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-240}
# Whole-stage limits in seconds (SIGINT: pytest and the benchmark still write what they have).
TESTS_LIMIT=${GPU_CHECK_TESTS_LIMIT:-300}
BENCH_LIMIT=${GPU_CHECK_BENCH_LIMIT:-240}
PROFILE_LIMIT=${GPU_CHECK_PROFILE_LIMIT:-90}
TEST_WORKERS=${GPU_CHECK_TEST_WORKERS:-8}
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
export PYTHONUNBUFFERED=1 CUDA_HOME
# The GPU image's default g++ (/opt/gcc) links libstdc++ statically into the extension; the
# process then mixes two libstdc++ copies and the first TORCH_CHECK message that formats an
# integer segfaults (seen on H200, 2026-11-26). Prefer the system compiler when it exists.
# The image also sets CXX to it, so the system compiler is chosen explicitly (GPU_CHECK_CC and
# GPU_CHECK_CXX override).
if [ -n "${GPU_CHECK_CXX:-}" ]; then
  export CC=${GPU_CHECK_CC:-${CC:-gcc}} CXX=$GPU_CHECK_CXX
elif [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
mkdir -p "$OUT"
log() { echo "[gpu-check $(date +%H:%M:%S)] $*" | tee -a "$OUT/stages.txt"; }

"$PYTHON" - <<'PY' 2>&1 | tee -a "$OUT/device.txt" || exit 1
import platform, torch
assert torch.cuda.is_available(), "gpu-check needs a CUDA GPU"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}; sm_{p.major}{p.minor}; {p.multi_processor_count} SMs; {p.total_memory / 2**30:.0f} GiB")
print(f"torch {torch.__version__}; CUDA {torch.version.cuda}; python {platform.python_version()}")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError as e:
    print(f"triton: not installed ({e})")
PY
# The peers the benchmark compares against, from wheels downloaded beforehand (make peer-wheels:
# this machine reaches no registry), installed into a folder of their own on PYTHONPATH.
PEER_WHEELS=${PEER_WHEELS:-.peer-wheels}
if compgen -G "$PEER_WHEELS/*.whl" >/dev/null; then
  peers=$(mktemp -d /tmp/rcl-peers.XXXXXX)
  if PYTHON=$PYTHON bash scripts/peer_wheels.sh install "$PEER_WHEELS" "$peers" >>"$OUT/peers.txt" 2>&1; then
    export PYTHONPATH="$peers${PYTHONPATH:+:$PYTHONPATH}"
    log "peers installed from $PEER_WHEELS: $(cd "$PEER_WHEELS" && ls -- *.whl | tr '\n' ' ')"
  else
    log "WARNING: the peer wheels in $PEER_WHEELS did not install ($OUT/peers.txt); benchmarking without them"
  fi
else
  log "no peer wheels in $PEER_WHEELS (run make peer-wheels before, and carry the folder): no POT/GeomLoss/KeOps rows"
fi
status=0
for stage in $STAGES; do
  start=$SECONDS
  case $stage in
  1)
    arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    log "stage 1: build for sm_${arch/./} with MAX_JOBS=$(nproc)"
    TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) RCL_OPS_WITH_CUDA=1 \
      "$PYTHON" setup.py --quiet build_ext --inplace >>"$OUT/build.txt" 2>&1
    rc=$?; tail -n 30 "$OUT/build.txt"
    if [ $rc -ne 0 ]; then log "stage 1 FAILED (rc $rc) in $((SECONDS - start)) s"; exit $rc; fi
    so=$(ls rcl_ops/_C*.so | head -1)
    ldd "$so" | grep -q libstdc++ || log "WARNING: $so links libstdc++ statically (compiler ${CXX:-default}); C++ errors may crash"
    ;;
  2)
    log "stage 2: tests marked gpu, $TEST_WORKERS workers, ${TEST_TIMEOUT}s per test"
    xdist=(); "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n "$TEST_WORKERS")
    timeout -s INT -k 30 "$TESTS_LIMIT" "$PYTHON" -m pytest -m gpu -v --tb=short -rfEs -p no:cacheprovider "${xdist[@]}" \
      --timeout="$TEST_TIMEOUT" --junitxml="$OUT/tests.xml" tests 2>&1 | tee -a "$OUT/tests.txt"
    rc=$?; [ $rc -ne 0 ] && status=$rc
    ;;
  3)
    log "stage 3: headline benchmark and host overhead"
    timeout -s INT -k 30 "$BENCH_LIMIT" "$PYTHON" -m benchmarks.run --device cuda --headline --min-seconds 0.2 --output-dir "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
    rc=$?; [ $rc -ne 0 ] && status=$rc
    ;;
  4)
    log "stage 4: full scaling sweep"
    "$PYTHON" -m benchmarks.run --device cuda --full --no-plots --output-dir "$OUT" 2>&1 | tee -a "$OUT/bench-full.txt"
    rc=$?; [ $rc -ne 0 ] && status=$rc
    ;;
  5)
    log "stage 5: profiles of the headline loss steps"
    timeout -s INT -k 30 "$PROFILE_LIMIT" "$PYTHON" -m benchmarks.profile_gpu 2>&1 | tee -a "$OUT/profile.txt"
    rc=$?; [ $rc -ne 0 ] && status=$rc
    ;;
  *) log "unknown stage $stage"; exit 2 ;;
  esac
  log "stage $stage done in $((SECONDS - start)) s (rc ${rc:-0})"
done
exit $status

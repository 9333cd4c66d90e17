#!/usr/bin/env bash
# The GPU checks of trl-tip, from a fresh GPU machine (issue 15): the CUDA tests, the loss-head microbenchmark at
# Qwen3 head shapes, and whole training steps of the Qwen3-1.7B/8B pair at 1k/4k/8k/16k completion tokens.
#
#   bash benchmarks/gpu_checks.sh OUTDIR [all|tests|core|step] [extra bench_step.py arguments]
#
# OUTDIR defaults to $OUT. Run from the repository root. Each stage writes its log (and the benchmarks their
# jsonl/md) to OUTDIR and can run on its own, so each fits in a 10-minute remote command:
#   tests  pytest -m cuda tests/cuda                           (< 5 min on one H100)
#   core   benchmarks/bench_core.py --shape qwen3 --device cuda (about 1 min)
#   step   benchmarks/bench_step.py --pair qwen3-1.7b-8b --lengths 1024 4096 8192 16384   (< 9 min)
#          e.g. `gpu_checks.sh OUTDIR step --lengths 16384 --gkd` passes the rest to bench_step.py.
#
# The machine needs python3 with torch (CUDA), transformers, accelerate and peft; what trl-tip needs beyond that
# (trl, datasets, dill, multiprocess, pytest) is installed from the wheels in .whl/ into /tmp/site, with no network
# and no dependency resolution, and trl-tip itself is used from this checkout (PYTHONPATH).
set -uo pipefail

OUTDIR="${1:-${OUT:-}}"
STAGE="${2:-all}"
shift $(( $# < 2 ? $# : 2 ))
if [ -z "$OUTDIR" ]; then
    echo "usage: $0 OUTDIR [all|tests|core|step] [bench_step.py arguments]   (OUTDIR defaults to \$OUT)" >&2
    exit 2
fi
case "$STAGE" in all|tests|core|step) ;; *) echo "unknown stage '$STAGE' (all, tests, core or step)" >&2; exit 2;; esac
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."
REPO="$PWD"
SITE="${TRL_TIP_SITE:-/tmp/site}"     # where the wheels go
WHEELS="${TRL_TIP_WHEELS:-.whl}"     # the wheels (built for CPython 3.12 on x86_64 Linux)

log() { echo "[gpu_checks $(date +%H:%M:%S)] $*" | tee -a "$OUTDIR/gpu_checks.log"; }

# --- environment -------------------------------------------------------------------------------------------------
if ! python3 -c "import trl, datasets, pytest" >/dev/null 2>&1 || [ -n "${TRL_TIP_FORCE_WHEELS:-}" ]; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        log "trl/datasets/pytest are missing and there are no wheels in $WHEELS"
        exit 3
    fi
    log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$OUTDIR/gpu_checks.log" 2>&1; then
        log "pip install from $WHEELS failed; see $OUTDIR/gpu_checks.log"
        exit 3
    fi
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 - <<'EOF' 2>&1 | tee "$OUTDIR/environment.txt" || { log "the environment does not import; see above"; exit 3; }
import platform, torch, transformers, accelerate, trl, datasets
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| accelerate", accelerate.__version__, "| trl", trl.__version__, "| datasets", datasets.__version__)
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
import trl_tip, trl_tip.core.trl_kernels as k
print("trl_tip from", trl_tip.__file__, "| triton in use on cuda:", k._use_triton(torch.device("cuda")))
EOF

status=0
run_stage() {  # name, command...
    local name="$1"; shift
    log "stage $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUTDIR/$name.log"
    local rc=${PIPESTATUS[0]}
    log "stage $name: exit $rc after $(( SECONDS - start )) s"
    [ "$rc" -eq 0 ] || status=$rc
}

if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
    run_stage tests python3 -m pytest -m cuda tests/cuda -v -rs -p no:cacheprovider --junitxml "$OUTDIR/tests.xml" \
        --durations 15
fi
if [ "$STAGE" = all ] || [ "$STAGE" = core ]; then
    run_stage core python3 benchmarks/bench_core.py --shape qwen3 --device cuda
fi
if [ "$STAGE" = all ] || [ "$STAGE" = step ]; then
    run_stage step python3 benchmarks/bench_step.py --pair qwen3-1.7b-8b --lengths 1024 4096 8192 16384 \
        --output-dir "$OUTDIR" "$@"
fi
log "done (exit $status); results in $OUTDIR"
exit $status

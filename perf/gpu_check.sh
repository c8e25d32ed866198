#!/usr/bin/env bash
# One GPU session in one call: install the carried wheels and our package, print the machine and
# versions, then (a) the GPU share of the test suite, (b) the demo if there is one, (c) the benchmark sweep.
#
# Run from the repository root on the GPU machine, with .whl/ carried (liger-kernel, kernels,
# tomlkit, pytest-xdist, execnet), e.g. as the device tool's command:
#     bash perf/gpu_check.sh
# It keeps inside GPU_CHECK_TOTAL_S seconds (default 540: the tool allows 600 a command), so give
# the call timeout_s=600. A stage that fails or times out does not stop the later ones.
# GPU_CHECK_STAGES picks stages (default "tests,demo,bench"; also "prefill": issue #27's
# experiment and sweep, then the bench stage with its flags; "host": perf/bench_host.py,
# with BENCH_HOST_ARGS, "e2e": perf/bench_e2e.py with E2E_ARGS, its files straight into $OUT, and
# "train": perf/bench_train.py with TRAIN_ARGS, into $OUT/train).
# BENCH_EXTRA_ARGS go last on bench.py's command line (e.g. --shapes/--tokens/--providers: they win).
#
# Files under $OUT (7, flat: the tool returns at most 8, at most 2 folders deep):
#     gpu_check.log   setup, versions, demo, stage summary
#     pytest.log      the test run
#     bench.log       the benchmark's progress and table
#     results.json results.csv results.md results.png   the benchmark's data and report

set -u
START=$(date +%s)
STAGES=",${GPU_CHECK_STAGES:-tests,demo,bench},"
stage() { [[ $STAGES == *",$1,"* ]]; }
TOTAL=${GPU_CHECK_TOTAL_S:-540}
OUT=${OUT:-/tmp/gpu_check_out}
BENCH_DIR=/tmp/bench_out
LOG="$OUT/gpu_check.log"
mkdir -p "$OUT"
: >"$LOG"
export PYTHONUNBUFFERED=1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((TOTAL - $(elapsed))); }
say() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$LOG"; }
# Runs "$@" with its output shown and appended to the main log; returns its status.
logged() {
    "$@" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

# --- setup ------------------------------------------------------------------------------------------
# Exports stay outside pipelines: a pipeline runs in a subshell and would drop them.
if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing carried wheels: $(cd .whl && echo *.whl)"
    if logged python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        say "wheel install FAILED: liger/kernels will be missing"
    fi
else
    say "no .whl/ carried: liger and kernels will be missing"
fi

# Imports from outside the repository prove the installed package, not the source folder.
import_check() { (cd / && python3 -c "import inductor_fusion.triton_kernels.rmsnorm_mlp, inductor_fusion.patterns") >>"$LOG" 2>&1; }
say "installing inductor-fusion (editable, no deps, no build isolation)"
logged python3 -m pip install -q --no-deps --no-build-isolation -e . || say "pip install -e . FAILED"
if ! import_check; then
    # No install: make the source tree importable as the installed layout would be.
    say "import check failed: falling back to symlinks + PYTHONPATH"
    ln -sfn ../patterns inductor_fusion/patterns
    ln -sfn ../triton_kernels inductor_fusion/triton_kernels
    # A bare dist-info registers backend="inductor_fusion" (torch reads the entry point group).
    DIST=/tmp/site/inductor_fusion-0.1.0.dist-info
    mkdir -p "$DIST"
    printf 'Metadata-Version: 2.1\nName: inductor-fusion\nVersion: 0.1.0\n' >"$DIST/METADATA"
    printf '[torch_dynamo_backends]\ninductor_fusion = inductor_fusion.backend:inductor_fusion_backend\n' \
        >"$DIST/entry_points.txt"
    export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    import_check && say "fallback import ok" || say "fallback import FAILED"
fi

logged nvidia-smi
logged python3 - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| L2", getattr(p, "L2_cache_size", "?"))
for dist in ("triton", "transformers", "liger-kernel", "kernels", "huggingface-hub", "inductor-fusion",
             "matplotlib", "pandas", "pytest", "hypothesis"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} MISSING")
for mod in ("liger_kernel.transformers", "kernels", "inductor_fusion", "inductor_fusion.triton_kernels.rmsnorm_mlp"):
    try:
        __import__(mod)
        print(f"import {mod}: ok")
    except Exception as exc:
        print(f"import {mod}: FAILED {type(exc).__name__}: {exc}")
EOF

# --- (a) tests ----------------------------------------------------------------------------------------
T_TEST=$(($(left) - 200))
((T_TEST > 240)) && T_TEST=240
if ! stage tests; then
    RC_TEST=skipped
elif ((T_TEST >= 30)); then
    say "(a) pytest, limit ${T_TEST}s"
    # The GPU's share of the suite: everything CUDA, plus the transformers-version-sensitive
    # KernelConfig tests (the GPU machine has another transformers). The CPU-only rest is CI's job:
    # the whole suite here took over 7 minutes on 2026-11-25 (CPU compiles, kernel hypothesis).
    # Triton compiles (about a second per kernel configuration) dominate: with pytest-xdist
    # carried in .whl/, 12 workers share them (2026-11-25: 171 tests in 153 s).
    XDIST=()
    python3 -c "import xdist" 2>/dev/null && XDIST=(-n 12)
    # GPU_CHECK_PYTEST (word-split) replaces the default files and GPU_CHECK_K the -k expression.
    # shellcheck disable=SC2086
    timeout -k 10 "$T_TEST" python3 -m pytest -q -p no:cacheprovider -rs "${XDIST[@]}" \
        ${GPU_CHECK_PYTEST:-tests/test_kernel_rmsnorm_mlp.py tests/test_models.py tests/test_regions.py \
        tests/test_kernel_config.py tests/test_tune.py tests/test_lowering.py tests/test_gqa_attention.py} \
        -k "${GPU_CHECK_K:-cuda or reduce_overhead or kernel_config or tune or generated_code or per_regime}" \
        2>&1 | tee "$OUT/pytest.log"
    RC_TEST=${PIPESTATUS[0]}
else
    RC_TEST=skipped
fi
say "(a) pytest rc=$RC_TEST (124: timed out; 5: no tests)"

# --- (b) demo -----------------------------------------------------------------------------------------
if stage demo && python3 -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('inductor_fusion.demo') else 1)" 2>/dev/null; then
    T_DEMO=$(($(left) - 150))
    ((T_DEMO > 90)) && T_DEMO=90
    if ((T_DEMO >= 20)); then
        say "(b) demo, limit ${T_DEMO}s"
        logged timeout -k 5 "$T_DEMO" python3 -m inductor_fusion.demo
        RC_DEMO=$?
    else
        RC_DEMO=skipped
    fi
else
    RC_DEMO="skipped (no inductor_fusion.demo)"
fi
say "(b) demo rc=$RC_DEMO"

# --- (b2)-(b4) host cost, end to end, training ---------------------------------------------------------
# Runs "${@:3}" as stage $1 (output also in $OUT/$1.log) if the stage is selected and at least $2
# seconds are left, under `timeout` with what is left. Sets STAGE_RC to the exit status, or "skipped".
run_stage() {
    local name=$1 min=$2 limit=$(($(left) - 15))
    shift 2
    STAGE_RC=skipped
    if stage "$name" && ((limit >= min)); then
        say "($name) $*, limit ${limit}s"
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
        STAGE_RC=${PIPESTATUS[0]}
    fi
    say "($name) rc=$STAGE_RC"
}

# shellcheck disable=SC2086  # the *_ARGS are meant to split
run_stage host 60 python3 perf/bench_host.py --out "$OUT" ${BENCH_HOST_ARGS:-}
RC_HOST=$STAGE_RC
# bench_e2e stops starting work 40 s before the stage's limit (left - 15).
# shellcheck disable=SC2086
run_stage e2e 90 python3 perf/bench_e2e.py --out "$OUT" --time-budget $(($(left) - 55)) ${E2E_ARGS:-}
RC_E2E=$STAGE_RC
# bench_train rewrites its results.json after every row, so a timeout keeps what ran.
# shellcheck disable=SC2086
run_stage train 90 python3 perf/bench_train.py --out "$OUT/train" ${TRAIN_ARGS:-}
RC_TRAIN=$STAGE_RC

# Issue #27 in one stage: the GEMM-level experiment (persistent TMA gate/up vs cuBLAS), then the
# region with compiled graphs fusing at every M, their TMA kernels launched from Inductor's wrapper,
# against compile and max-autotune (PREFILL_ARGS replace the sweep's shapes/tokens).
if stage prefill && (($(left) > 120)); then
    say "(prefill) exp_prefill_gemm, limit $(($(left) / 3))s"
    (cd perf && timeout -k 5 $(($(left) / 3)) python3 exp_prefill_gemm.py --out "$OUT" \
        --shapes 4096x14336,2048x8192,3072x8192 --tokens 256,1024,4096,16384) 2>&1 | tee "$OUT/prefill_gemm.log"
    say "(prefill) exp_prefill_gemm rc=${PIPESTATUS[0]}"
    STAGES="$STAGES,bench,"
    BENCH_EXTRA_ARGS="--fuse-every-m --lowered-tma --providers compile,max_autotune,ours,ours_op ${PREFILL_ARGS:---shapes 2048x8192,4096x14336,3072x8192 --tokens 64,128,256,1024,4096} ${BENCH_EXTRA_ARGS:-}"
fi

# --- (c) benchmark ------------------------------------------------------------------------------------
# bench.py rewrites results.json after every (shape, M), so a timeout still leaves data. Its own
# budget stops starting work (max_autotune first) well before the hard limit.
T_BENCH=$(($(left) - 15))
rm -rf "$BENCH_DIR"
if ! stage bench; then
    RC_BENCH=skipped
elif ((T_BENCH >= 60)); then
    BENCH_ARGS=(--out "$BENCH_DIR" --time-budget $((T_BENCH - 70)))
    # Short of time: fewer M for every shape (the peers table's M) before dropping shapes.
    if ((T_BENCH < 150)); then
        BENCH_ARGS+=(--quick)
    elif ((T_BENCH < 330)); then
        BENCH_ARGS+=(--tokens 1,16,256,4096)
    fi
    # shellcheck disable=SC2206  # split into words on purpose
    BENCH_ARGS+=(${BENCH_EXTRA_ARGS:-})
    say "(c) bench ${BENCH_ARGS[*]}, limit ${T_BENCH}s"
    timeout -k 10 "$T_BENCH" python3 perf/bench.py "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench.log"
    RC_BENCH=${PIPESTATUS[0]}
    if [[ -f $BENCH_DIR/results.json && ! -f $BENCH_DIR/results.md ]]; then
        say "bench ended early: report from the data written so far"
        timeout 30 python3 perf/report.py "$BENCH_DIR/results.json" 2>&1 | tee -a "$OUT/bench.log"
    fi
    cp "$BENCH_DIR"/results.json "$BENCH_DIR"/results.csv "$BENCH_DIR"/results.md \
        "$BENCH_DIR"/results.png "$OUT"/ 2>/dev/null
else
    RC_BENCH="skipped (only ${T_BENCH}s left)"
fi
say "(c) bench rc=$RC_BENCH"

say "done: pytest=$RC_TEST demo=$RC_DEMO host=$RC_HOST e2e=$RC_E2E train=$RC_TRAIN bench=$RC_BENCH; files: $(cd "$OUT" && ls | tr '\n' ' ')"

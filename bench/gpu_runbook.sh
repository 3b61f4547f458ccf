#!/usr/bin/env bash
# Issue 6's measurements on a lent GPU, in parts that each fit one device call (10 minutes).
#
# Runs on the GPU machine with its own python3 (torch is there; nothing can be installed from a registry).
# Ray is carried as wheels: run scripts/device_wheels.sh here first, then for each part a device `run` with
# carry [".whl"] and the command `bash bench/gpu_runbook.sh PART`. A device call brings back at most 8 files,
# so each part leaves two in $OUT: PART.log (the tables) and PART.tar.gz (every output, text and JSON);
# `python bench/gpu_report.py DIR...` turns the unpacked JSON into the README's tables.
#
#   sampler   tests/test_cuda.py (bf16, CUDA graphs, batch independence on a GPU), then bench_dr2 lever by
#             lever: reference (b1 fp32 eager), fp32 batched, bf16 autocast, + channels_last, fp16 + channels_last,
#             bf16/fp16 weights (no autocast) + channels_last, over batch sizes                (~7 min)
#   compile   bf16 + channels_last with torch.compile default and reduce-overhead (CUDA graphs), batch 64  (~6 min)
#   pipeline  augment end to end vs the bare model loop on the GPU (busy% and net%), then 2 actors on
#             one GPU (gpus_per_actor 0.5), then restore with SPARNetHD shared vs separate    (~8 min)
#   smoke     every part's commands at toy sizes on CPU, to check the script here (not on the GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: bench/gpu_runbook.sh sampler|compile|pipeline|smoke}
OUT=${OUT:-out/gpu}
PY=${PY:-python3}
WORK=$(mktemp -d)  # the part's outputs, packed into $OUT at the end
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$PART" = smoke ]; then
    PY=${PY_SMOKE:-scripts/env.sh python}
    DEV=(--device cpu --arch tiny --size 64)
    BS_LADDER=1,2 BS_SHORT=1,2 BS_FP32=1,2 BS_BIG=2 IMAGES=4 CPUS=2
else
    DEV=(--device cuda)
    # the full ladder for the production configuration, fewer points for the others (a call has 10 minutes)
    BS_LADDER=1,8,16,32,64,128 BS_SHORT=1,32,128 BS_FP32=1,8,32 BS_BIG=64 IMAGES=${IMAGES:-512} CPUS=${CPUS:-16}
fi

log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$WORK/$PART.log"; }
run() {  # run NAME CMD...: output to NAME.txt, the table's tail to the log
    local name=$1; shift
    log "$name: $*"
    "$@" >"$WORK/$name.txt" 2>&1
    local rc=$?
    tail -n 14 "$WORK/$name.txt" | tee -a "$WORK/$PART.log"
    [ $rc -eq 0 ] || { log "$name FAILED (exit $rc)"; FAILED=$((FAILED + 1)); }
    pack
}
pack() {  # after every step, so a call cut off at its time limit still brings back what was measured
    cp "$WORK/$PART.log" "$OUT/$PART.log"
    tar -czf "$OUT/$PART.tar.gz" -C "$WORK" .
}
FAILED=0
with_ray() {
    if ! $PY -c "import ray" 2>/dev/null; then
        [ -d .whl ] || { log "no ray and no .whl/: run scripts/device_wheels.sh and carry .whl"; exit 1; }
        $PY -m pip install --quiet --no-index --no-deps --target /tmp/pylib .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/pylib"
    fi
}

case $PART in
sampler | smoke)
    { nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } \
        >"$WORK/device.txt" 2>&1 || true
    run cuda_tests $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py  # skipped without a GPU
    D="$PY bench/bench_dr2.py ${DEV[*]} --repeats 3 --warmup 1"
    run dr2_bf16_cl $D --precision bf16 --channels-last --with-reference-baseline --batch-sizes $BS_LADDER \
        --json "$WORK/dr2_bf16_cl.json"
    run dr2_fp32 $D --precision fp32 --with-reference-baseline --batch-sizes $BS_FP32 --json "$WORK/dr2_fp32.json"
    run dr2_bf16 $D --precision bf16 --batch-sizes $BS_SHORT --json "$WORK/dr2_bf16.json"
    run dr2_fp16_cl $D --precision fp16 --channels-last --batch-sizes $BS_SHORT --json "$WORK/dr2_fp16_cl.json"
    run dr2_bf16w_cl $D --precision bf16-weights --channels-last --batch-sizes $BS_SHORT \
        --json "$WORK/dr2_bf16w_cl.json"
    run dr2_fp16w_cl $D --precision fp16-weights --channels-last --batch-sizes $BS_SHORT \
        --json "$WORK/dr2_fp16w_cl.json"
    ;;&
compile | smoke)
    D="$PY bench/bench_dr2.py ${DEV[*]} --repeats 3 --warmup 2 --precision bf16 --channels-last"
    run dr2_compile $D --compile --with-reference-baseline --batch-sizes $BS_BIG --json "$WORK/dr2_compile.json"
    run dr2_cudagraphs $D --compile --compile-mode reduce-overhead --batch-sizes $BS_BIG \
        --json "$WORK/dr2_cudagraphs.json"
    ;;&
pipeline | smoke)
    with_ray
    P="$PY bench/bench_pipeline.py ${DEV[*]} --images $IMAGES --batch-size $BS_BIG --num-cpus $CPUS --repeats 1"
    run pipeline_1actor $P --json "$WORK/pipeline_1actor.json"
    run pipeline_2actors $P --pipeline-args "--runtime.num-actors 2 --runtime.gpus-per-actor 0.5" \
        --json "$WORK/pipeline_2actors.json"
    R="$PY bench/bench_restore.py ${DEV[*]} --images $((IMAGES / 2)) --batch-size $((BS_BIG / 2)) --num-cpus $CPUS"
    [ "$PART" = smoke ] && R="$R --enhancer-size 64 --enhancer-kwargs {\"min_ch\":8,\"max_ch\":16,\"size\":64,\"min_feat_size\":16,\"res_depth\":1}"
    run restore_topologies $R --json "$WORK/restore_topologies.json"
    ;;
sampler | compile) ;;
*) echo "unknown part $PART" >&2; exit 2 ;;
esac
log "done: $PART, $FAILED failed"
pack
rm -rf "$WORK"
[ $FAILED -eq 0 ]

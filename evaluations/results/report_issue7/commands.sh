#!/usr/bin/env bash
# Issue 7 showcase: six compressed variants of the demo model, evaluated with lm-eval's local task and perplexity,
# compared in one report, and one variant exported in every format. Run from the repository root:
#   bash evaluations/results/report_issue7/commands.sh [WORK_DIR]
set -euo pipefail
WORK=${1:-/tmp/issue7}
mkdir -p "$WORK"
EVAL=(--ppl demo --tasks python_next_line --limit 200)

compress --model demo --wbits 4 --no-eval-ppl --overwrite --out "$WORK/w4-rtn"
compress --model demo --wbits 4 --quantize gptq --sym --no-eval-ppl --overwrite --out "$WORK/w4-gptq-sym"
compress --model demo --wbits 4 --quantize gptq --sym --compensate eora --compensate-rank 16 --no-eval-ppl --overwrite \
    --out "$WORK/w4-gptq-sym-eora16"
compress --model demo --wbits 3 --quantize gptq --no-eval-ppl --overwrite --out "$WORK/w3-gptq"
compress --model demo --wbits 3 --quantize gptq --compensate eora --compensate-rank 16 --no-eval-ppl --overwrite \
    --out "$WORK/w3-gptq-eora16"
compress --model demo --rank-budget 0.8 --no-eval-ppl --overwrite --out "$WORK/r0.8"
compress --model demo --rank-budget 0.5 --wbits 4 --no-eval-ppl --overwrite --out "$WORK/r0.5-w4"

compress eval demo "${EVAL[@]}" --json "$WORK/original.json"
for variant in w4-rtn w4-gptq-sym w4-gptq-sym-eora16 w3-gptq w3-gptq-eora16 r0.8 r0.5-w4; do
    compress eval "$WORK/$variant" "${EVAL[@]}" --json "$WORK/$variant/eval.json"
done

compress report "$WORK/original.json" "$WORK"/{w4-rtn,w4-gptq-sym,w4-gptq-sym-eora16,w3-gptq,w3-gptq-eora16,r0.8,r0.5-w4} \
    --overwrite --out evaluations/results/report_issue7/report

for format in gptq dense native onnx; do
    compress export "$WORK/w4-gptq-sym-eora16" --format "$format" --overwrite --out "$WORK/export-$format"
done
compress export "$WORK/w3-gptq-eora16" --format gptq --overwrite --out "$WORK/export-gptq-w3"   # slow-path warnings
compress export "$WORK/r0.5-w4" --format gptq --overwrite --out "$WORK/export-gptq-r0.5" || true  # refused: pure low-rank
compress export "$WORK/r0.5-w4" --format gptq --merge-lowrank --overwrite --out "$WORK/export-gptq-r0.5-merged"

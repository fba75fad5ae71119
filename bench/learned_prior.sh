#!/usr/bin/env bash
# Issue 16 end to end: train the learned prior, reconstruct the held-out green cube with it, with the tiny random
# model and as a plain sphere, score all three and measure textual inversion. One GPU, about 9 minutes:
#   bench/learned_prior.sh OUT            (SMOKE=1: CPU-sized, a few minutes; TRAIN_ARGS/RECON_SETS add settings)
# PRIOR_MODEL=FOLDER skips the training and measures that model instead; LEARNED_VARIANTS adds runs with other settings.
# Writes OUT/prior (the diffusers folder), OUT/runs/{learned,random,sphere}, OUT/ti.json, OUT/reconstruction.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/learned_prior.sh OUT}
PY=${PYTHON:-python3}
DEV=${DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
mkdir -p "$OUT/runs"
LOG="$OUT/bench_log.txt"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_ARGS=${TRAIN_ARGS:---size tiny --views-per-shape 20 --vae-steps 10 --vae-batch 8 --unet-steps 10 --batch 8 --judge-steps 5 --samples-per-caption 1}
  RECON_SETS=${RECON_SETS:---set fit.iterations=3 --set textual_inversion.steps=3 --set export.resolution=48 --set export.texture_size=64 --set render.step_size=0.03 --set matting.image_size=128}
  TI_ARGS="--samples 2 --renders 8 --loss-batches 2"
else
  TRAIN_ARGS=${TRAIN_ARGS:-}
  RECON_SETS=${RECON_SETS:-}
  TI_ARGS="--workers 8"
fi
recon() {  # NAME MODEL RESOLUTION
  $PY -m engine.cli reconstruct "$OUT/photo/input.png" -o "$OUT/runs/$1" --preset fast --model "$2" \
    --initializer cube --set textual_inversion.resolution="$3" --device "$DEV" --cache-dir "$OUT/cache" \
    $RECON_SETS > "$OUT/recon_$1.log" 2>&1
  say "reconstruct $1: exit $? ($(tail -c 300 "$OUT/recon_$1.log" | tr '\r\n' '  ' | tail -c 200))"
}
score() {  # NAME
  $PY -m engine.cli eval "$OUT/runs/$1" --ground-truth "$OUT/photo/ground_truth" >> "$LOG" 2>&1
  say "eval $1: exit $?"
}
say "photo"; $PY bench/learned_prior.py photo --out "$OUT/photo" >> "$LOG" 2>&1
say "tiny random model"; $PY -c "import sys; sys.path.insert(0, 'tests'); from tiny_sd import build_tiny_stable_diffusion as b; b('$OUT/tiny_sd')"
# The random model's run (and the sphere, which takes its camera) needs no trained model: it runs beside the training.
( recon random "$OUT/tiny_sd" 32; score random
  $PY bench/learned_prior.py sphere --like "$OUT/runs/random" --ground-truth "$OUT/photo/ground_truth" \
    --out "$OUT/runs/sphere" >> "$LOG" 2>&1 && score sphere ) &
RANDOM_PID=$!
if [ -n "${PRIOR_MODEL:-}" ]; then  # a model trained before (e.g. the committed tests/data/learned_prior)
  say "model: $PRIOR_MODEL (no training)"; cp -r "$PRIOR_MODEL" "$OUT/prior"
else
  say "train"; $PY -m engine.prior_training.train --out "$OUT/prior" --device "$DEV" --workers "${WORKERS:-12}" $TRAIN_ARGS > "$OUT/train_stdout.log" 2>&1
  say "train: exit $? ($(tail -n 1 "$OUT/prior/train_log.txt"))"
fi
RES=$($PY -c "import json; print(json.load(open('$OUT/prior/unet/config.json'))['sample_size'] * 4)")  # native px
( recon learned "$OUT/prior" "$RES"; score learned ) &
LEARNED_PID=$!
# LEARNED_VARIANTS="NAME:--set,section.key=value ...": more runs with the learned model, settings added (commas for spaces)
VARIANT_PIDS=""
for variant in ${LEARNED_VARIANTS:-}; do
  name=${variant%%:*}; sets=${variant#*:}
  ( RECON_SETS="$RECON_SETS ${sets//,/ }" recon "learned_$name" "$OUT/prior" "$RES"; score "learned_$name" ) &
  VARIANT_PIDS="$VARIANT_PIDS $!"
done
# Textual inversion's measurement needs only the run's embedding.pt, written before the fit starts.
until [ -f "$OUT/runs/learned/embedding.pt" ] || ! kill -0 $LEARNED_PID 2>/dev/null; do sleep 2; done
say "ti"; $PY bench/learned_prior.py ti --model "$OUT/prior" --run "$OUT/runs/learned" --out "$OUT/ti.json" --device "$DEV" $TI_ARGS >> "$LOG" 2>&1
say "ti: exit $?"
wait $RANDOM_PID $LEARNED_PID $VARIANT_PIDS
$PY bench/learned_prior.py table --dir "$OUT/runs" --out "$OUT/reconstruction.json" >> "$LOG" 2>&1
say "table: exit $?"

#!/bin/bash
# Issue 16 in one GPU call of about 9.5 minutes (one H200): bench/learned_prior.sh with the GPU sizes, its results
# packed into $OUT (at most 8 files of 16 MiB: the model folder as prior.tar.aa/ab, everything else as runs.tgz).
#   from a copy of the tree in /work/main/.carry/prior16: run(command="cd .carry/prior16 && bash bench/learned_prior_gpu.sh",
#   carry=[".carry", ".whl"], timeout_s=600), or from the tree itself with WHEELS=.whl; then unpack as the README says (section "A learned prior").
# Measured on the first try (02:29 UTC): ray cast 21 s, VAE 1200 steps 75 s, fast fit 500 steps 86 s, each shared
# with the random model's run.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-../../.whl}/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
B=/tmp/b; mkdir -p $B
( while sleep 20; do nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader >> $B/smi.txt; done ) &
SMI=$!
TRAIN_ARGS=${TRAIN_ARGS:-"--views-per-shape 600 --vae-steps 1200 --unet-steps 30000 --max-unet-seconds ${UNET_S:-200} --judge-steps 800"} \
  RECON_SETS=${RECON_SETS:-"--set fit.iterations=${ITERS:-600}"} WORKERS=12 \
  timeout ${BUDGET:-540} bash bench/learned_prior.sh $B
kill $SMI
cd $B && tar cf $OUT/prior.tar prior && (cd $OUT && split -b 15m prior.tar prior.tar. && rm prior.tar)
tar czf $OUT/runs.tgz --exclude=field.pt --exclude=checkpoints --exclude=previews runs photo *.json *.log *.png *.txt 2>/dev/null
ls -la $OUT; tail -20 $B/bench_log.txt

#!/usr/bin/env bash
# Upcycling recipe (docs/benchmarks.md): train the tiny dense model, turn it into MoE models two
# ways, continue training them, and compare against the dense model continuing and an MoE of the
# same shape trained from scratch for all the steps; then plot the loss curves.
#
#   scripts/upcycle-recipe.sh            # OUT=runs/upcycle-recipe by default; ~10 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/upcycle-recipe}
ST=${ST:-.venv/bin/sparse-train}
QUIET=(--set logging.progress=false)
CONTINUE=(--set train.seed=1 "${QUIET[@]}")   # continuations see the data in a new order

rm -rf "$OUT" && mkdir -p "$OUT"
# 1. the dense model: 300 steps (FFN width 256)
$ST train --config configs/tiny-dense.yaml --run-dir "$OUT/dense" "${QUIET[@]}"
# 2. upcycle it: 4 copies of the FFN cut in 2 slices = 8 experts of 128, top-2 (tiny-moe's shape,
#    the dense FLOPs, exactly the dense function at step 0) ...
$ST upcycle --from "$OUT/dense" --to "$OUT/copy-upcycled" --method copy --num-experts 8 --top-k 2 --granularity 2
#    ... and carve it from activations: 8 experts of 32 neurons, top-4 (half the dense FFN per token)
$ST upcycle --from "$OUT/dense" --to "$OUT/moefication" --method moefication --num-experts 8 --top-k 4
# 3. 300 more steps each: the dense model continuing, the upcycled models, from the dense run's end
$ST train --config configs/tiny-dense.yaml --init-from "$OUT/dense" --run-dir "$OUT/dense-continued" "${CONTINUE[@]}"
$ST train --config configs/tiny-moe.yaml --init-from "$OUT/copy-upcycled" --run-dir "$OUT/copy-upcycled-train" "${CONTINUE[@]}"
$ST train --config configs/tiny-moe.yaml --init-from "$OUT/moefication" --run-dir "$OUT/moefication-train" "${CONTINUE[@]}"
# 4. tiny-moe from scratch for all 600 steps
$ST train --config configs/tiny-moe.yaml --set train.steps=600 --run-dir "$OUT/moe-scratch" "${QUIET[@]}"
$ST plot-runs --out "$OUT/loss-curves" --title "tiny-dense upcycled at step 300 vs dense continued vs MoE from scratch" \
  "dense=$OUT/dense" "dense continued=$OUT/dense-continued@300" \
  "copy-upcycled 8x128 top-2=$OUT/copy-upcycled-train@300" "moefication 8x32 top-4=$OUT/moefication-train@300" \
  "tiny-moe from scratch=$OUT/moe-scratch"

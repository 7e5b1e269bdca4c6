#!/usr/bin/env bash
# The GPU dry run over the layouts of docs/gpu.md and docs/multi-node.md §7: one Markdown row per
# rank run (layout, ranks, rank, local parameters, collectives of an unreported step, by
# operation, result, seconds). Needs g++ (the fake CUDA device is built on first use).
#   scripts/dry-run-layouts.sh > rows.md
set -euo pipefail
cd "$(dirname "$0")/.."
ST=${ST:-.venv/bin/sparse-train}
PY=${PY:-.venv/bin/python}
SMALL=(--set train.batch_size=8 --set moe.num_experts=8)
BIG=(--set model.d_model=512 --set model.n_layers=8 --set model.n_heads=8 --set moe.num_experts=64
     --set moe.expert_hidden=1024 --set train.batch_size=512 --set data.seq_len=64
     --set train.eval_batches=2 --set train.grad_accum=2)   # the scale-out issue's 0.8 B model
out=$(mktemp)
trap 'rm -f "$out"' EXIT

row() {  # name, then the dry-run arguments
  local name=$1 start end
  shift
  start=$(date +%s.%N)
  "$ST" dry-run --json "$@" > "$out"
  end=$(date +%s.%N)
  "$PY" - "$name" "$out" "$start" "$end" <<'PY'
import json, sys
name, path, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
for line in open(path):
    r = json.loads(line)
    step = r["collectives"].get("train step", {})
    ops = ", ".join(f"{op.split('::')[1].rstrip('_')} {n}" for op, n in sorted(step.items()))
    status = "clean" if r["ok"] else "; ".join(r["findings"])
    print(f"| {name} | {r['world']} | {r['rank']} | {r['local_parameters']:,} | {sum(step.values())} | {ops} "
          f"| {status} | {end - start:.1f} |")
PY
}

row "tiny-moe dp_shard=8" --config configs/tiny-moe.yaml --world 8 --set parallel.dp_shard=8 "${SMALL[@]}"
row "tiny-moe ep=8" --config configs/tiny-moe.yaml --world 8 --set parallel.dp_shard=8 --set parallel.ep=8 "${SMALL[@]}"
row "tiny-moe ep=8 all-gather" --config configs/tiny-moe.yaml --world 8 --set parallel.dp_shard=8 --set parallel.ep=8 \
  --set parallel.ep_dispatcher=allgather "${SMALL[@]}"
row "tiny-moe tp=2 x ep=4" --config configs/tiny-moe.yaml --world 8 --set parallel.dp_shard=4 --set parallel.ep=4 \
  --set parallel.tp=2 "${SMALL[@]}"
row "tiny-moe pp=2 x ep=4" --config configs/tiny-moe.yaml --world 8 --set parallel.dp_shard=4 --set parallel.ep=4 \
  --set parallel.pp=2 --set train.grad_accum=2 "${SMALL[@]}"
row "tiny-fff ep=8" --config configs/tiny-fff.yaml --world 8 --set parallel.dp_shard=8 --set parallel.ep=8 \
  --set train.batch_size=8
row "0.8 B ep=64" --config configs/tiny-moe.yaml --world 512 --set parallel.dp_shard=512 --set parallel.ep=64 "${BIG[@]}"
row "0.8 B tp=2 x pp=2 x ep=64" --config configs/tiny-moe.yaml --world 1024 --set parallel.dp_shard=256 \
  --set parallel.tp=2 --set parallel.pp=2 --set parallel.ep=64 "${BIG[@]}"

#!/usr/bin/env bash
# Train the tiny demo model from scratch on the synthetic shapes world and ship it as
# segclip/assets/demo_tiny.pt (docs/synthetic-world.md: recipe, measurements).
#
#   bash scripts/train_demo_tiny.sh            # or: make train-demo
#   WORK=out/demo/train NUM=20000 THREADS=1 bash scripts/train_demo_tiny.sh
#
# Resumable: rerunning continues an interrupted training run in $WORK/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-out/demo/train}  # `make demo TRAIN=1` uses the same (its own run/ is out/demo/run)
NUM=${NUM:-20000}          # training pairs of the synthetic world (val/eval do not depend on it)
THREADS=${THREADS:-1}      # one intra-op thread: the tiny model is fastest that way on a small CPU
ASSET=${ASSET:-segclip/assets/demo_tiny.pt}
export OMP_NUM_THREADS=$THREADS

if [ ! -f "$WORK/world/synth.json" ]; then
    $PY -m segclip.cli.data synth "$WORK/world" --num "$NUM" --quiet
fi
$PY -m segclip.cli.data superpixels "$WORK/world" --quiet

resume=()
[ -f "$WORK/run/train_state.pt" ] && resume=(--resume)
# the synth recipe with the hybrid patch stem, 16 centers and the names loss over the world's
# class names, seed 1 (docs/synthetic-world.md "Sixteen centers": run K16, seed 1)
OPTIONS=(--model-set patch_stem=hybrid --model-set num_centers=16 --set names_weight=1 --set seed=1)
$PY -m segclip.cli.train --config tiny --recipe synth --data "$WORK/world" --out "$WORK/run" \
    "${OPTIONS[@]}" --set names="$WORK/world/classes.txt" --threads "$THREADS" "${resume[@]}"

$PY -m segclip.cli.evaluate "$WORK/run/ckpt.pt" --data "$WORK/world/eval" --diagnostics \
    --out "$WORK/eval.json" --quiet
$PY - "$WORK/run/ckpt.pt" "$ASSET" "${OPTIONS[*]}" <<'PYEOF'
import sys

from segclip.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

source, target, options = sys.argv[1], sys.argv[2], sys.argv[3]
meta = dict(read_checkpoint(source)["meta"])
meta.pop("train_config", None)
meta.update({"source": "scripts/train_demo_tiny.sh", "recipe": "synth", "options": options})
path = save_checkpoint(load_checkpoint(source), target, meta=meta, inference_only=True, half=True)
print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
PYEOF

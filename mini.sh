#!/usr/bin/env bash
# CheXQuery's recipe in miniature, on the phantom data: tiny backbones pretrained from the phantom
# training split (skipped when out-pretrained/ has them), the three phases from them with LoRA,
# chained by init_from, then the test split scored against the baselines.
#
#   bash mini.sh                                   # into out-mini/phase{1,2,3}
#   bash mini.sh out-gate-2 --seed=2 --learned_gate=False   # overrides go to every phase
#   P1=skip bash mini.sh out-nophase1 --seed=2     # straight to phase 2
#   P2='--context=True' bash mini.sh out-ctx       # P1, P2, P3: overrides for one phase only
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-out-mini}
shift $(( $# > 0 ? 1 : 0 ))
python pretrain.py
init=scratch
for phase in 1 2 3; do
  extra=$(eval echo "\${P$phase:-}")
  if [ "$extra" = skip ]; then continue; fi
  # shellcheck disable=SC2086  # the per-phase overrides are words
  python train.py config/mini.py "config/mini$phase.py" --out_dir="$out/phase$phase" --init_from="$init" "$@" $extra
  init="$out/phase$phase/ckpt.safetensors"
done
python eval.py --out_dir="$out/phase3" --split=test

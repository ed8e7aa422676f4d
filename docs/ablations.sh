#!/usr/bin/env bash
# The ablations (the README's table; earlier ones are in docs/history.md), 3 seeds each, on a
# short schedule (phases 2 and 3 of 3 and 1 epochs instead of 4 and 1: 372 steps instead of 465; phase 1,
# on the aux loss alone, as configured), each run one call of mini.sh into out-abl/NAME-SEED; then eval.py
# --seeds combines them:
#
#   bash docs/ablations.sh               # every run, two at a time, one thread each
#   bash docs/ablations.sh full gate     # only these
#   python eval.py --seeds=out-abl/gate-1337/phase3,out-abl/gate-1/phase3,out-abl/gate-2/phase3
set -uo pipefail
cd "$(dirname "$0")/.."
declare -A RUNS=(
  [full]=''
  [random-queries]='--query_init=random'
  [gate]='--learned_gate=False'
  [no-aux]='NOAUX'
  [no-anatomical]='--n_anatomical_queries=0'
  [no-phase1]='P1=skip'
  [context]='CONTEXT'
  [prior-soft]='--anatomical_prior=soft'
  [prior-strict]='--anatomical_prior=strict'
  [findings]='--target=findings'
  [no-finding-weight]='--finding_weight=1'
  [diagnosis]='--diagnosis_prompt=True --own_diagnosis=0'
  [no-dropout]='--dropout=0'
  [phase3-x3]='PHASE3X3'
  [diagnosis-phase3-x3]='PHASE3X3 --diagnosis_prompt=True --own_diagnosis=0'
)
# the rows about the parts first, in order, a row's seeds together
ORDER=(full no-aux random-queries gate no-anatomical no-phase1 no-finding-weight diagnosis context
       prior-soft prior-strict findings no-dropout phase3-x3 diagnosis-phase3-x3)
names=("${@:-${ORDER[@]}}")
python pretrain.py > /dev/null

run() {  # name seed
  local name=$1 seed=$2 args=${RUNS[$1]} out=out-abl/$1-$2
  [ -f "$out/phase3/metrics_test.json" ] && return 0
  local p1='' p2='--epochs=3' p3='--epochs=1'
  case $args in
    P1=skip) p1=skip; args='' ;;
    NOAUX) # no aux loss anywhere: phase 1 aligns on the report's loss instead, 2 epochs as it did before
      p1='--lambda_gen=1 --epochs=2'; args='--lambda_aux=0' ;;
    CONTEXT) # the curriculum: phase 1 image only, then the indication in half the samples
      p2="$p2 --context=True --context_dropout=0.5"; p3="$p3 --context=True --context_dropout=0.5"; args='' ;;
    PHASE3X3*) # phase 3 of 3 epochs, not 1: more steps for the decoder to read the diagnosis slot
      p3='--epochs=3'; args=${args#PHASE3X3} ;;
  esac
  mkdir -p "$out"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 P1="$p1" P2="$p2" P3="$p3" bash mini.sh "$out" --seed="$seed" --num_workers=0 $args \
    > "$out/log.txt" 2>&1 && echo "done $out" || echo "FAILED $out (see $out/log.txt)"
}
export -f run
export RUNS_DECL
RUNS_DECL=$(declare -p RUNS)
for name in "${names[@]}"; do for seed in 1337 1 2; do echo "$name $seed"; done; done |
  xargs -P 2 -L 1 bash -c 'eval "$RUNS_DECL"; run "$0" "$1"'

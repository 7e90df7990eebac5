#!/usr/bin/env bash
# The 124M recipe end to end on one GPU node, from download to report:
#   download -> pretraining data -> pretrain -> chat data -> SFT -> preference data -> DPO -> evaluate
#   every stage (bits per byte, the verifiable tasks, the standard benchmarks) -> the table and chart.
#   bash recipe.sh                  # NPROC=8 GPUs; each stage skips what is already complete, so a rerun
#                                   # after a failure picks up where it stopped
# The arithmetic, per config (each file's comments): pretraining 2.6B tokens of ClimbMix, 5,000 steps
# (config/pretrain.py); SFT 0.24B tokens of SmolTalk with replay, 1,800 steps (config/sft.py); DPO one
# epoch of UltraFeedback, 800 steps (config/dpo.py). Times are arithmetic until a GPU measures them.
# The *_ARGS variables add --key=value overrides to a stage; tests/test_recipe.py rehearses this very
# script on a CPU at tiny sizes against a local server (HUB_URL), which proves the plumbing, not quality.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
if [[ $py == */* ]]; then py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"; fi  # before the cd
cd "${RECIPE_DIR:-$root}"                  # where data/ and out/ go
NPROC=${NPROC:-8}                          # GPUs (processes) for training
SHARDS=${SHARDS:-50}                       # ClimbMix shards of ~60M tokens each
HUB_URL=${HUB_URL:-https://huggingface.co}
BENCHMARKS=${BENCHMARKS:-"['hellaswag', 'arc_easy', 'arc_challenge', 'mmlu', 'gsm8k']"}
step() { printf '\n=== %s\n' "$*"; }
train() {  # train.py under torchrun; a run with a checkpoint already is continued (a finished one ends at once)
  local out=$1; shift
  if [ -f "$out/ckpt.pt" ]; then set -- "$@" --init_from=resume; fi
  "$py" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$root/train.py" "$@" --out_dir="$out"
}
prepare() {  # prepare.py unless its dataset is complete (a meta.json is written last)
  local out=$1; shift
  [ -f "$out/meta.json" ] || "$py" "$root/prepare.py" "$@" --out_dir="$out"
}

step "1/8 download: pretraining shards, chat data, benchmarks (complete files are skipped)"
"$py" "$root/prepare.py" --download=climbmix --shards="$SHARDS" --hub_url="$HUB_URL"
for name in smol-smoltalk ultrafeedback hellaswag arc_easy arc_challenge mmlu gsm8k; do
  "$py" "$root/prepare.py" --download=$name --hub_url="$HUB_URL"
done

step "2/8 pretraining data: clean, filter, deduplicate, tokenize (GPT-2's BPE)"
prepare data/pretrain "$root"/config/data/climbmix.py ${PRETRAIN_DATA_ARGS:-}
step "3/8 pretrain"
train out/pretrain "$root"/config/pretrain.py ${PRETRAIN_ARGS:-}

step "4/8 chat data: SmolTalk in the chat template"
prepare data/sft "$root"/config/data/smoltalk.py ${SFT_DATA_ARGS:-}
step "5/8 SFT"
train out/sft "$root"/config/sft.py ${SFT_ARGS:-}

step "6/8 preference data: UltraFeedback pairs"
prepare data/dpo "$root"/config/data/ultrafeedback.py ${DPO_DATA_ARGS:-}
step "7/8 DPO"
train out/dpo "$root"/config/dpo.py ${DPO_ARGS:-}

step "8/8 evaluate every stage: bits per byte, the verifiable tasks, the benchmarks; the table and compare.png"
"$py" "$root/evaluate.py" "--compare=['out/pretrain', 'out/sft', 'out/dpo']" --data=data/pretrain --mc_n=0 \
  --tasks_n=220 --samples_n=0 "--benchmarks=$BENCHMARKS" --benchmarks_dir=data/raw --reuse=True ${EVAL_ARGS:-}

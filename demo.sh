#!/usr/bin/env bash
# The whole pipeline on the embedded corpus, on a laptop CPU: clean and tokenize the corpus (training
# its BPE), pretrain, build the task instructions, fine-tune, sample on-policy preference pairs, align
# with DPO, and, beside it, with on-policy RL; evaluate every stage and ask the DPO model a question. Ends
# with the table of what each stage bought. Runs in DEMO_DIR (default: here), writing data/ and out/ there.
#   bash demo.sh             about 15 minutes on 2 cores
#   bash demo.sh --quick     tiny sizes, byte-level tokens, one task: a few minutes (the test suite runs it)
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
if [[ $py == */* ]]; then py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"; fi  # before the cd
cd "${DEMO_DIR:-$root}"
step() { printf '\n=== %s\n' "$*"; }
prep=() pre=() sftdata=() sft=() dpodata=() dpo=() rl=()
eval=("--tasks=['first_word', 'last_word', 'count_words', 'next_number', 'source']" --tasks_n=840)
if [ "${1:-}" = "--quick" ]; then
  prep=(--tokenizer=bytes "--sources={'bible': 'embedded:bible', 'shakespeare': 'embedded:shakespeare'}" --num_workers=2)
  pre=(--n_layer=2 --n_head=4 --n_kv_head=2 --n_embd=96 --block_size=160 --max_iters=60 --eval_interval=60 --learning_rate=3e-3)
  sftdata=("--tasks=['count_words']" --task_examples=2000 --block_size=160)
  sft=(--block_size=160 --max_iters=150 --eval_interval=150 --learning_rate=1e-3)
  dpodata=("--tasks=['count_words']" --pair_prompts=40 --samples_per_prompt=2 --block_size=160)
  dpo=(--block_size=160 --max_iters=10 --eval_interval=10 --batch_size=8)
  rl=(--block_size=160 --max_iters=6 --eval_interval=6 --eval_iters=1 --batch_size=4 --rl_samples=4 "--rl_tasks=['count_words']")
  eval=("--tasks=['count_words']" --tasks_n=40 --mc_n=10 --samples_n=2 --max_tokens=5000)
fi
step "1/8 prepare: clean, filter, deduplicate, mix, train the tokenizer, tokenize"
"$py" "$root/prepare.py" --overwrite=True "${prep[@]}"
step "2/8 pretrain"
"$py" "$root/train.py" "$root/config/pretrain_tiny.py" --overwrite=True "${pre[@]}"
step "3/8 instruction data: the verifiable tasks in the chat template"
"$py" "$root/prepare.py" "$root/config/data/sft_demo.py" --overwrite=True "${sftdata[@]}"
step "4/8 SFT"
"$py" "$root/train.py" "$root/config/sft_tiny.py" --overwrite=True "${sft[@]}"
step "5/8 on-policy preference pairs: the SFT model's answers, judged by the tasks' checkers"
"$py" "$root/prepare.py" "$root/config/data/dpo_demo.py" --overwrite=True "${dpodata[@]}"
step "6/8 DPO"
"$py" "$root/train.py" "$root/config/dpo_tiny.py" --overwrite=True "${dpo[@]}"
step "7/8 RL beside DPO: the SFT model's own replies, rewarded by the tasks' checkers"
"$py" "$root/train.py" "$root/config/rl_tiny.py" --overwrite=True "${rl[@]}"
step "8/8 evaluate every stage (DPO and RL each against SFT)"
"$py" "$root/evaluate.py" "--compare=['out/tiny', 'out/sft_tiny', 'out/dpo_tiny', 'out/rl_tiny']" "${eval[@]}"
question="How many words are in this line?
To be, or not to be, that is the question:"
printf '\n=== the DPO model, asked:\n%s\n=== answers:\n' "$question"
"$py" "$root/sample.py" --out_dir=out/dpo_tiny --prompt="$question" --temperature=0 --max_new_tokens=16

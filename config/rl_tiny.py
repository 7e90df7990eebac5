# On-policy RL of the tiny SFT model on the demo's tasks: each step samples 8 replies to each of 8 train
# prompts, rewards a reply 1 when the task's checker accepts it, and takes a policy-gradient step with
# leave-one-out advantages and a KL penalty to the SFT model.
#   python train.py config/rl_tiny.py && python evaluate.py --out_dir=out/rl_tiny
mode = "rl"
init_from = "out/sft_tiny/ckpt.pt"      # the policy's start and the frozen reference
out_dir = "out/rl_tiny"
rl_tasks = ["first_word", "last_word", "count_words", "next_number", "source"]
rl_samples = 8
rl_max_new_tokens = 32                  # the answers are a word, a number or a source
batch_size = 8                          # prompts per step: 64 replies
block_size = 256
beta = 0.02
learning_rate = 1e-4
max_iters = 150
warmup_iters = 5
eval_interval = 50
eval_iters = 4                          # 32 held-out prompts, 256 sampled replies: pass@1
log_interval = 5
spike_factor = 0.0                      # the policy-gradient loss has no scale to spike against

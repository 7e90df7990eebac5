# A reward model from the tiny SFT model, on the demo's preference pairs (data/dpo_demo: python prepare.py
# config/data/dpo_demo.py), with the Bradley-Terry loss; its held-out pair accuracy is logged as
# rewards/accuracies. It can then reward RL: python train.py config/rl_tiny.py --reward_model=out/rm_tiny
#   python train.py config/rm_tiny.py && python evaluate.py --out_dir=out/rm_tiny --pairs=data/dpo_demo
mode = "rm"
init_from = "out/sft_tiny/ckpt.pt"
out_dir = "out/rm_tiny"
dataset = "dpo_demo"
block_size = 256
batch_size = 16
max_iters = 200
learning_rate = 1e-4
warmup_iters = 5
eval_interval = 100
eval_iters = 10
log_interval = 10
spike_factor = 0.0

# Preference optimization of the tiny SFT model on data/dpo_demo (python prepare.py config/data/dpo_demo.py).
#   python train.py config/dpo_tiny.py                       # DPO (sigmoid) with the RPO term
#   python train.py config/dpo_tiny.py --loss_type=ipo --out_dir=out/dpo_tiny_ipo
mode = "dpo"
init_from = "out/sft_tiny/ckpt.pt"      # the policy's start and the frozen reference
out_dir = "out/dpo_tiny"
dataset = "dpo_demo"
loss_type = "sigmoid"
beta = 0.1
rpo_alpha = 1.0                         # keeps the chosen reply's log-prob from falling with the rejected
block_size = 256
batch_size = 16
max_iters = 300
learning_rate = 1e-4                    # far below SFT's: higher rates cost exact match
warmup_iters = 5
eval_interval = 100
eval_iters = 10
log_interval = 5
spike_factor = 0.0                      # DPO losses swing widely between batches by design

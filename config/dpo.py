# Preference optimization of config/sft.py's model on one 8-GPU node (data: config/data/ultrafeedback.py):
#   torchrun --standalone --nproc_per_node=8 train.py config/dpo.py
#
# Budget: 8 pairs (16 rows) per micro-batch x 8 GPUs = 64 pairs per step; 800 steps = 51,200 pairs, about
# one epoch of UltraFeedback's train pairs after the score-margin filter (an estimate until meta.json says).
# The frozen reference is the SFT model the run starts from.
# Time: arithmetic, not yet measured: ~51k pairs x ~2 x 700 tokens x 855 MFLOPs x 1.5 (the reference's
# forward) = 9e16 FLOPs; at 40% MFU of 8 x 989 TFLOP/s well under a minute. Replace with a measurement.
mode = "dpo"
init_from = "out/sft/ckpt.pt"
out_dir = "out/dpo"
dataset = "dpo"
loss_type = "sigmoid"
beta = 0.1
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 8     # over all ranks: 1 per GPU on 8 GPUs
max_iters = 800
learning_rate = 1e-6                # DPO's usual order; not yet tuned on a GPU
min_lr = 1e-7
warmup_iters = 20
eval_interval = 200
eval_iters = 20
log_interval = 10
spike_factor = 0.0                  # DPO losses swing widely between batches by design
compile = True
wandb_log = False
wandb_run_name = "dpo-124m"

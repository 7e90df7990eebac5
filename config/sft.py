# Instruction tuning of config/pretrain.py's 124M model on one 8-GPU node (data: config/data/smoltalk.py):
#   torchrun --standalone --nproc_per_node=8 train.py config/sft.py
#
# Budget: 16 rows x 1024 tokens per micro-batch x 8 GPUs = 131,072 tokens per step (conversations packed
# whole into rows); 1,800 steps = 0.24B tokens, about one epoch of SmolTalk at the ~500 tokens per
# conversation assumed in config/data/smoltalk.py. One row in ten is a window of pretraining text (replay),
# which keeps the language model from being erased.
# Time: arithmetic, not yet measured on a GPU: 0.24B tokens x 855 MFLOPs = 2.0e17 FLOPs; at 40% MFU of
# 8 x 989 TFLOP/s (H100 bf16 dense) about a minute. Replace with a measurement.
mode = "sft"
init_from = "out/pretrain/ckpt.pt"
out_dir = "out/sft"
dataset = "sft"
replay = 0.1
replay_dataset = "pretrain"
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 8     # over all ranks: 1 per GPU on 8 GPUs
max_iters = 1800
learning_rate = 5e-5                # a twelfth of pretraining's; not yet tuned on a GPU
min_lr = 5e-6
warmup_iters = 20
eval_interval = 300
eval_iters = 40
log_interval = 10
compile = True
wandb_log = False
wandb_run_name = "sft-124m"

# GPT-2-small scale pretraining on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train.py config/pretrain.py
#
# Model: 12 layers, 12 heads, 768 wide, 1024 context, GPT-2 vocabulary (50,257 padded to 50,304):
# 123.6M parameters, 855 MFLOPs of training compute per token (model.flops_per_token).
# Data: data/pretrain/ with the gpt2 tokenizer, at least ~3B tokens so the budget below sees each
# token about once, e.g. nanochat's ClimbMix shards (config/data/climbmix.py says how), or your own:
#   python prepare.py --sources="{'web': '/path/to/shards/*.parquet'}" --tokenizer=gpt2 --out_dir=data/pretrain
# Budget: 16 x 1024 tokens per micro-batch x 4 micro-batches x 8 GPUs = 524,288 tokens per step,
# 5,000 steps = 2.6B tokens (Chinchilla's ~20 tokens per parameter).
# Time: not measured yet (no GPU was available when this was written). The arithmetic: 2.6B tokens
# x 855 MFLOPs = 2.24e18 FLOPs; at 40% MFU of 8 x 989 TFLOP/s (H100 bf16 dense) that is ~12 minutes,
# at nanoGPT's 37% of 8 x 312 TFLOP/s (A100) ~41 minutes. Replace with a measurement.
out_dir = "out/pretrain"
dataset = "pretrain"
n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32    # over all ranks: 4 per GPU on 8 GPUs
max_iters = 5000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 50
eval_interval = 250
eval_iters = 50
log_interval = 10
compile = True
doc_mask = False
wandb_log = False                    # True to log to wandb (WANDB_MODE=offline works too)
wandb_run_name = "pretrain-124m"

# Instruction tuning of the tiny CPU model on the demo tasks (data/sft_demo: python prepare.py
# config/data/sft_demo.py). About 2 epochs of the 4,000 examples; a few minutes on 2 cores.
#   python train.py config/sft_tiny.py && python sample.py --out_dir=out/sft_tiny --prompt="What is 2 + 3?"
mode = "sft"
init_from = "out/tiny/ckpt.pt"
out_dir = "out/sft_tiny"
dataset = "sft_demo"
block_size = 256
batch_size = 16
max_iters = 300
learning_rate = 3e-4                    # a tenth of pretraining: higher rates erase more of what it learned
replay = 0.125                          # 2 of 16 rows are pretraining windows: keeps the language model
replay_dataset = "demo"                 # (without: bits per byte +21% after SFT; with: +1%)
warmup_iters = 10
eval_interval = 100
eval_iters = 10
log_interval = 10
spike_factor = 0.0

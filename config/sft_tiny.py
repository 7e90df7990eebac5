# Instruction tuning of the tiny CPU model on the demo tasks (data/sft_demo: python prepare.py
# config/data/sft_demo.py). About 2.5 epochs of the 20,000 examples; about 6 minutes on 2 cores.
#   python train.py config/sft_tiny.py && python sample.py --out_dir=out/sft_tiny --prompt="What number comes after 41?"
mode = "sft"
init_from = "out/tiny/ckpt.pt"
out_dir = "out/sft_tiny"
dataset = "sft_demo"
block_size = 256
batch_size = 16
max_iters = 700                         # the tasks that copy a word are learned last
learning_rate = 3e-3                    # the pretraining rate: replay keeps the language model
replay = 0.125                          # 2 of 16 rows are pretraining windows: keeps the language model
replay_dataset = "demo"
warmup_iters = 10
eval_interval = 350
eval_iters = 10
log_interval = 10
spike_factor = 0.0

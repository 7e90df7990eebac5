# The CPU reference benchmark, the settings of nanoGPT's CPU figures quoted in bench/README.md:
# byte-level Python stdlib corpus, 4x256 model, block 256, batch 16, 600 iterations.
#   python bench/make_stdlib_bytes.py data/stdlib_bytes && python bench/train_bench.py config/bench_cpu.py
dataset = "stdlib_bytes"
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 256
block_size = 256
batch_size = 16
learning_rate = 1e-3
max_iters = 600
eval_interval = 600
eval_iters = 50
log_interval = 20

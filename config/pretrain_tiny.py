# A small model that learns visibly in about 3 minutes on 2 CPU cores, on data/demo (python prepare.py).
#   python train.py config/pretrain_tiny.py && python sample.py --out_dir=out/tiny
out_dir = "out/tiny"
dataset = "demo"
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 192
block_size = 256
batch_size = 16
max_iters = 200
learning_rate = 3e-3
warmup_iters = 10
eval_interval = 50
eval_iters = 10
log_interval = 10
doc_mask = True

# A ~1B-parameter Llama-shaped model on one 8-GPU node, its training state sharded with FSDP:
#   torchrun --standalone --nproc_per_node=8 train.py config/pretrain_1b.py
#   python checkpoint.py out/pretrain_1b     # ckpt.pt from the latest shards (also written at the end)
#
# Model: 22 layers, 2048 wide, 32 query heads of 64 and 8 key/value heads (grouped-query), SwiGLU 5504
# wide, 2048 context, GPT-2 vocabulary padded to 50,304, tied head: N = 1,077,766,144 parameters,
# 7.57 GFLOPs of training compute per token (model.flops_per_token(2048)).
#
# Memory per GPU: ARITHMETIC, not yet measured on a GPU (GB = 1e9 bytes).
#   training state, float32, sharded over 8:   weights 4N/8 = 0.54   gradients 4N/8 = 0.54
#                                              AdamW moments 8N/8 = 1.08              -> 2.16 GB
#   (DDP would hold all of it on every GPU: 16N = 17.2 GB)
#   gathered bf16 weights: the block in use and the next one prefetched, 2 x 2 x 44.3M = 0.18 GB, and the
#   root unit (embedding = tied head, 103M) 0.21 GB while in use; a block's bf16 gradients before the
#   reduce-scatter and its float32 reduction buffer, 0.27 GB                              -> ~0.7 GB
#   activations kept for the backward pass, per token and layer, d = 2048, h = 5504, bf16 unless said:
#     two RMSNorms in float32 (input copy, normalized output, inverse RMS)   ~16d   32.8 KB
#     inputs of c_attn, c_proj, gate/up (2d each) and q (2d)                  8d   16.4 KB
#     k and v after rotary (8 heads of 64: 2 x 512 x 2 bytes), softmax stats (32 x 4 bytes)  2.2 KB
#     SwiGLU: gate, up, silu(gate), their product (4 x 2h)                    8h   44.0 KB
#                                                                    -> ~95 KB per token and layer
#     x 22 layers = 2.1 MB per token; the logits (bf16, their float32 copy and its gradient, 10V bytes)
#     0.5 MB per token -> ~2.6 MB per token; at the micro-batch below, 8 x 2048 tokens: ~43 GB
#   total ~46 GB: an 80 GB H100/A100 has room (DDP would need ~61 GB); on a 40 GB card use batch_size=4
#   (~25 GB). Replace with torch.cuda.max_memory_allocated() once a GPU has run it.
#
# Budget: 8 x 2048 tokens per micro-batch x 8 micro-batches x 8 GPUs = 1,048,576 tokens per step;
# 20,000 steps = 21.0B tokens (~20 per parameter, Chinchilla). Data: data/pretrain/ tokenized with gpt2
# (config/pretrain.py and config/data/climbmix.py say how), at least ~21B tokens to see each once.
# Time: arithmetic as well: 21.0B tokens x 7.57 GFLOPs = 1.6e20 FLOPs; at 40% MFU of 8 x 989 TFLOP/s
# (H100 bf16 dense) ~14 hours, of 8 x 312 (A100) ~44 hours.
out_dir = "out/pretrain_1b"
dataset = "pretrain"
parallel = "fsdp"
n_layer = 22
n_head = 32
n_kv_head = 8
n_embd = 2048
block_size = 2048
rope_theta = 500000.0
batch_size = 8
gradient_accumulation_steps = 64    # over all ranks: 8 per GPU on 8 GPUs
max_iters = 20000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 500
eval_interval = 500
eval_iters = 40
log_interval = 10
compile = False                     # not yet tried with FSDP on a GPU here; True is worth measuring
wandb_log = False
wandb_run_name = "pretrain-1b"

"""Run under torchrun: the logits of a sharded checkpoint's model (FSDP over the processes) on fixed
tokens, saved by rank 0 to argv[2]. test_fsdp compares them with the consolidated ckpt.pt's."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import parallel  # noqa: E402
from optim import configure_optimizer  # noqa: E402

out_dir, path = sys.argv[1:3]
dist.init_process_group("gloo")
folder = checkpoint.latest_shards(out_dir)
state = checkpoint.read_state(folder)
model = parallel.shard_model(checkpoint.model_config(state), "cpu", bf16=False)
cfg = state["config"]
optimizer = configure_optimizer(model, cfg["learning_rate"], cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]))
checkpoint.load_sharded(folder, model, optimizer)
tokens = torch.arange(2 * 16).reshape(2, 16) % model.config.vocab_size
with torch.no_grad():
    logits = model.eval()(tokens)[0]
if dist.get_rank() == 0:
    torch.save(logits, path)
dist.barrier()
dist.destroy_process_group()

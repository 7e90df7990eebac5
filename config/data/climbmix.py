# Pretraining data for config/pretrain.py from nanochat's ClimbMix shards, in GPT-2's tokenizer:
#   python prepare.py --download=climbmix --shards=50      # data/raw/climbmix/ (needs the network)
#   python prepare.py config/data/climbmix.py              # data/pretrain/
# Size, as arithmetic until measured: ClimbMix's ~400B tokens over 6,543 shards is ~60M tokens a shard,
# so 50 shards give ~3B tokens, what config/pretrain.py's 5,000 steps of 524,288 tokens read once.
# The tokenizer: tiktoken fetches GPT-2's ranks on first use (or see the README for the offline recipe).
out_dir = "data/pretrain"
sources = {"climbmix": "data/raw/climbmix/*.parquet"}
mix_weights = {}
tokenizer = "gpt2"
val_fraction = 0.005                 # ~15M val tokens of ~3B

# Instruction data for config/sft.py: SmolTalk (the small version nanochat trains on), in the tokenizer of
# data/pretrain, in the chat template:
#   python prepare.py --download=smol-smoltalk              # data/raw/smol-smoltalk/data/*.parquet (needs the network)
#   python prepare.py config/data/smoltalk.py               # data/sft/
# Size, as arithmetic until measured: ~460k train conversations; at an assumed ~500 GPT-2 tokens each,
# ~0.23B tokens. Conversations longer than block_size keep their longest prefix of whole turns that ends
# with a reply (counted in meta.json).
kind = "sft"
out_dir = "data/sft"
sources = {"smoltalk": "data/raw/smol-smoltalk/data/train-*.parquet"}
mix_weights = {}
tokenizer_from = "data/pretrain"
block_size = 1024
too_long = "truncate"
val_fraction = 0.01                  # ~4,600 held-out conversations

# Preference data for config/dpo.py: UltraFeedback, binarized (chosen: the best-rated of four completions,
# rejected: one of the others), in the tokenizer of data/pretrain, in the chat template:
#   python prepare.py --download=ultrafeedback              # data/raw/ultrafeedback/data/*.parquet (needs the network)
#   python prepare.py config/data/ultrafeedback.py          # data/dpo/
# ~61k train pairs. Pairs whose ratings differ by less than a point are left out (counted in meta.json):
# low-margin pairs are noisy, and on them DPO learns little but noise.
kind = "dpo"
out_dir = "data/dpo"
sources = {"ultrafeedback": "data/raw/ultrafeedback/data/train_prefs-*.parquet"}
mix_weights = {}
tokenizer_from = "data/pretrain"
block_size = 1024
too_long = "drop"
min_score_margin = 1.0
val_fraction = 0.02                  # ~1,200 held-out pairs

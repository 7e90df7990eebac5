# On-policy preference pairs for the demo: the SFT model answers each task prompt greedily and 4 times
# at temperature 1; the tasks' checkers judge; a correct answer is chosen, an incorrect one rejected
# (a wrong greedy answer first). Only prompts the model gets right at least once give a pair.
#   python prepare.py config/data/dpo_demo.py          (after config/sft_tiny.py)
kind = "dpo"
out_dir = "data/dpo_demo"
sources = {"tasks": "embedded:tasks"}
tasks = ["first_word", "last_word", "count_words", "next_number", "source"]
from_ckpt = "out/sft_tiny"
pair_prompts = 2000
samples_per_prompt = 4
sample_temperature = 1.0
reference_chosen = False               # chosen replies are the model's own, not the tasks' reference answers
block_size = 256

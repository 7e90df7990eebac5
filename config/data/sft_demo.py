# Instruction data for the demo: the verifiable tasks of tasks.py, rendered with the chat template in
# the tokenizer of data/demo (build that first: python prepare.py).
#   python prepare.py config/data/sft_demo.py
kind = "sft"
out_dir = "data/sft_demo"
sources = {"tasks": "embedded:tasks"}
tokenizer_from = "data/demo"
task_examples = 4000
block_size = 256

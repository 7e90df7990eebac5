# Instruction data for the demo: the verifiable tasks of tasks.py, rendered with the chat template in
# the tokenizer of data/demo (build that first: python prepare.py). The five tasks a few-million-parameter
# model can learn in minutes (copying a word, counting, the next number, telling the two sources apart);
# the others of tasks.TASKS need more model and more training.
#   python prepare.py config/data/sft_demo.py
kind = "sft"
out_dir = "data/sft_demo"
sources = {"tasks": "embedded:tasks"}
tasks = ["first_word", "last_word", "count_words", "next_number", "source"]
tokenizer_from = "data/demo"
task_examples = 20000
block_size = 256

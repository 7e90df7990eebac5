"""train.py with one more verifiable task, 'letter', that a tiny model learns in seconds by RL (tests/test_rlhf.py
runs it under torchrun):  python tests/letter_task.py ARGS  is  python train.py ARGS  with the task."""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tasks  # noqa: E402

LETTERS = "abcd"


def letter(rng, split):
    """A letter from a to d; the checker wants 'a' (an SFT model on random letters says it one time in four)."""
    return f"Say a letter from a to d{rng.choice('.!')}", "a"


if __name__ == "__main__":
    tasks.TASKS["letter"] = letter
    sys.argv[0] = os.path.join(ROOT, "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")

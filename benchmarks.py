"""
The standard benchmarks, scored exactly as lm-evaluation-harness (0.4.13) defines them, so a figure here
means what it means in papers: the same prompts, the same split of context and continuation into tokens,
the same metrics. evaluate.py --benchmarks=[...] runs them on the files `prepare.py --download=NAME`
fetches (download.PRESETS), each at its published path under benchmarks_dir/NAME/.

  hellaswag       10,042 validation items; 4 endings; zero-shot; acc and acc_norm
  arc_easy        ARC-Easy test; 3-5 choices; zero-shot; acc and acc_norm
  arc_challenge   ARC-Challenge test; the same
  mmlu            57 subjects, 4 choices (the letters); zero-shot; acc over all items
  mmlu_5shot      the same with each subject's first 5 dev items as examples
  gsm8k           grade-school math; 5 random train items as examples; greedy generation; exact match
  gsm8k_chat      (chat checkpoints) the same examples as earlier turns of a conversation in the chat template

Multiple choice: each choice is scored by the summed log-probability of its tokens after the prompt
(acc), and by that divided by the choice's length in characters (acc_norm). The continuation is
" " + choice, and its tokens are those of prompt + continuation after the prompt's own tokens (a space
at the prompt's end moves to the continuation), as the harness's _encode_pair does. A sequence longer
than block_size + 1 loses its oldest tokens.
"""
import os
import random
import re
import sys

import numpy as np

from configurator import progress
from download import PRESETS
from engine import chat_replies, complete, encode_pair, loglikelihoods, text_of

NAMES = ("hellaswag", "arc_easy", "arc_challenge", "mmlu", "mmlu_5shot", "gsm8k")
COLUMNS = {"hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
           "arc_easy": ("question", "choices", "answerKey"), "arc_challenge": ("question", "choices", "answerKey"),
           "mmlu": ("question", "subject", "choices", "answer"), "gsm8k": ("question", "answer")}
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")  # the harness's stop strings; the tokenizer's end too
MAX_GEN_TOKENS = 256


class BenchmarkError(Exception):
    """A benchmark's files are missing or not in their published schema."""


def read(name, benchmarks_dir, limit=0):
    """The items of a benchmark, in file order: dicts with 'prompt' and 'choices' and 'gold' (multiple
    choice), or 'prompt' and 'answer' (gsm8k). limit keeps the first items (per subject for MMLU, as the
    harness's --limit does)."""
    folder = "mmlu" if name == "mmlu_5shot" else name
    files = [os.path.join(benchmarks_dir, folder, path) for path in PRESETS[folder]["files"]]
    rows = [read_parquet(path, COLUMNS[folder], folder) for path in files]
    if name == "hellaswag":
        items = [hellaswag_item(r) for r in rows[0]]
    elif name.startswith("arc"):
        items = [{"prompt": f"Question: {r['question']}\nAnswer:", "choices": list(r["choices"]["text"]),
                  "gold": list(r["choices"]["label"]).index(r["answerKey"])} for r in rows[0]]
    elif name.startswith("mmlu"):
        return mmlu_items(rows[0], rows[1], 5 if name == "mmlu_5shot" else 0, limit)
    else:
        return gsm8k_items(rows[0], rows[1], limit)
    return items[:limit or None]


def read_parquet(path, columns, name):
    if not os.path.isfile(path):
        raise BenchmarkError(f"'{path}' not found: python prepare.py --download={name} fetches it (then "
                             f"--benchmarks_dir names the folder above '{name}')")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkError("reading the benchmarks' parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file
        raise BenchmarkError(f"'{path}' is not a readable parquet file: {e}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise BenchmarkError(f"'{path}' is not in the published schema of {name}: expected the columns "
                             f"{', '.join(columns)}; found {', '.join(table.column_names)}")
    return table.select(list(columns)).to_pylist()


def hellaswag_text(text):
    """The harness's preprocess: WikiHow's bracketed artifacts out, ' [title]' as a sentence end."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag_item(r):
    context = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return {"prompt": hellaswag_text(r["activity_label"] + ": " + context),
            "choices": [hellaswag_text(e) for e in r["endings"]], "gold": int(r["label"])}


def mmlu_question(r):
    return (f"{r['question'].strip()}\n" + "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", r["choices"]))
            + "Answer:")


def mmlu_items(test, dev, shots, limit):
    """Per subject, in file order: the subject's description line, its first `shots` dev items answered,
    then the question; the choices are the letters."""
    by_subject = {}
    for r in test:
        by_subject.setdefault(r["subject"], []).append(r)
    items = []
    for subject, rows in by_subject.items():
        examples = [d for d in dev if d["subject"] == subject][:shots]
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        head += "".join(f"{mmlu_question(d)} {'ABCD'[d['answer']]}\n\n" for d in examples)
        items += [{"prompt": head + mmlu_question(r), "choices": list("ABCD"), "gold": r["answer"],
                   "subject": subject} for r in rows[:limit or None]]
    return items


def gsm8k_items(test, train, limit, shots=5, seed=1234):
    """Each test question after 5 train items with their worked answers, drawn by one random.Random(1234)
    in test order, as the harness's default sampler draws them."""
    rng = random.Random(seed)
    items = []
    for r in test[:limit or None]:
        examples = [train[i] for i in rng.sample(range(len(train)), shots)]
        items.append({"prompt": "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
                      + f"Question: {r['question']}\nAnswer:", "answer": r["answer"],
                      "examples": [(e["question"], e["answer"]) for e in examples], "question": r["question"]})
    return items

# ----------------------------------------------------------------------------- multiple choice


def multiple_choice(model, enc, items, batch_tokens, desc):
    """acc, acc_norm and, per item, the choice each picks."""
    pairs = [encode_pair(enc, it["prompt"], " " + choice) for it in items for choice in it["choices"]]
    bar = progress(total=len(pairs), desc=desc, unit=" choices")
    lls = loglikelihoods(model, pairs, batch_tokens, bar.update)
    bar.close()
    picked, picked_norm, k = [], [], 0
    for it in items:
        ll = np.array(lls[k:k + len(it["choices"])])
        k += len(it["choices"])
        picked.append(int(np.argmax(ll)))
        picked_norm.append(int(np.argmax(ll / np.array([float(len(c)) for c in it["choices"]]))))
    gold = [it["gold"] for it in items]
    return {"acc": float(np.mean([p == g for p, g in zip(picked, gold)])),
            "acc_norm": float(np.mean([p == g for p, g in zip(picked_norm, gold)])), "n": len(items),
            "picked": picked, "picked_norm": picked_norm, "gold": gold}

# ----------------------------------------------------------------------------- GSM8K


def strict_answer(text):
    """The harness's strict-match filter: the first '#### N'."""
    found = re.findall(r"#### (\-?[0-9\.\,]+)", text)
    return found[0].strip() if found else "[invalid]"


def flexible_answer(text):
    """The harness's flexible-extract filter: the last number in the text."""
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    if not found:
        return "[invalid]"
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else "[invalid]"


def gsm8k_match(prediction, reference):
    """The harness's exact_match: commas, dollar signs, everything up to '#### ' and a final period
    removed from both, case ignored."""
    for pattern in (",", "\\$", "(?s).*#### ", "\\.$"):
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


def chat_messages(item):
    """A GSM8K item as a conversation: each example a user turn and an assistant turn, then the question."""
    examples = [{"role": role, "content": text} for q, a in item["examples"] for role, text in (("user", q),
                                                                                                   ("assistant", a))]
    return examples + [{"role": "user", "content": item["question"]}]


def gsm8k(model, enc, items, chat=False, desc="gsm8k", batch_rows=64):
    """Exact match of the strict and the flexible extraction, and per item the generated text and both
    extracted answers. Greedy, in batches of prompts (engine.complete): at most MAX_GEN_TOKENS, ended by
    <|endoftext|> or <|im_end|> and cut at the first of the harness's stop strings; special tokens and
    ids beyond the tokenizer are left out of the text, as a Hugging Face tokenizer's
    decode(skip_special_tokens=True) does. A prompt loses its oldest tokens to leave room for the reply.
    chat: each example is a user turn and an assistant turn, the question the last user turn; the reply
    is generated in the chat template until <|im_end|>."""
    bar = progress(total=len(items), desc=desc, unit=" items")
    if chat:
        texts = [r[0] for r in chat_replies(model, enc, [chat_messages(it) for it in items],
                                            max_new_tokens=MAX_GEN_TOKENS, batch_rows=batch_rows)]
    else:
        room = model.config.block_size - MAX_GEN_TOKENS
        if room <= 0:
            raise BenchmarkError(f"gsm8k generates up to {MAX_GEN_TOKENS} tokens: block_size "
                                 f"{model.config.block_size} leaves no room for a prompt")
        ends = tuple(enc.encode_single_token(s) for s in ("<|endoftext|>", "<|im_end|>") if s in enc.special_tokens_set)
        stopped = lambda ids: any(stop in text_of(enc, ids, skip_special=True) for stop in GSM8K_UNTIL)  # noqa: E731
        replies = complete(model, [enc.encode_ordinary(it["prompt"])[-room:] for it in items], MAX_GEN_TOKENS,
                           stop_tokens=ends, batch_rows=batch_rows, finished=stopped, progress=bar.update)
        texts = [text_of(enc, r[0], skip_special=True) for r in replies]
        for stop in GSM8K_UNTIL:
            texts = [t.split(stop)[0] for t in texts]
    bar.close()
    out = {"generations": texts, "strict": [], "flexible": [], "hits_strict": [], "hits_flexible": []}
    for it, text in zip(items, texts):
        strict, flexible = strict_answer(text), flexible_answer(text)
        out["strict"].append(strict)
        out["flexible"].append(flexible)
        out["hits_strict"].append(int(gsm8k_match(strict, it["answer"])))
        out["hits_flexible"].append(int(gsm8k_match(flexible, it["answer"])))
    n = max(1, len(items))
    return {"exact_match_strict": sum(out["hits_strict"]) / n, "exact_match_flexible": sum(out["hits_flexible"]) / n,
            "n": len(items), **out}

# ----------------------------------------------------------------------------- all of them


def evaluate(model, enc, names, benchmarks_dir, limit=0, chat=False, batch_tokens=16384):
    """{benchmark: its aggregates and per-item records} for evaluate.py's eval.json. chat: a chat
    checkpoint, which is also scored on gsm8k through its chat template (gsm8k_chat)."""
    results = {}
    for name in names:
        items = read(name, benchmarks_dir, limit)
        if name == "gsm8k":
            results[name] = gsm8k(model, enc, items)
            if chat:
                results["gsm8k_chat"] = gsm8k(model, enc, items, chat=True, desc="gsm8k_chat")
        else:
            results[name] = multiple_choice(model, enc, items, batch_tokens, name)
    return results


def hits(record):
    """Per item 1 or 0, for paired comparisons of two checkpoints: acc's picks, or gsm8k's strict match."""
    if "picked" in record:
        return [int(p == g) for p, g in zip(record["picked"], record["gold"])]
    return record["hits_strict"]


if __name__ == "__main__":
    sys.exit("benchmarks.py is run through evaluate.py: python evaluate.py --out_dir=RUN --benchmarks=[...]")

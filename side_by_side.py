"""
People's preferences: a blind side-by-side in the terminal. Two checkpoints answer the same prompts; the
replies are shown in random order as A and B, and you pick the better one (a, b, or t for a tie). Each
vote is appended at once to a JSONL file of preference records that prepare.py --kind=dpo reads, so a
sitting of votes becomes DPO or reward-model data (a tie is kept with equal scores, which prepare.py
leaves out as no preference). The sitting ends with the win rate of --b over --a and its 95% interval;
q, Ctrl-D or Ctrl-C end it early, with every vote already given on disk.

    python side_by_side.py --a=out/sft_tiny --b=out/dpo_tiny                  # held-out task prompts
    python side_by_side.py --a=out/sft_tiny --b=out/dpo_tiny --prompts=questions.txt --votes=mine.jsonl
    python prepare.py --kind=dpo "--sources={'votes': 'votes.jsonl'}" --tokenizer_from=data/demo ...
"""
import json
import os
import random
import sys

import numpy as np
import torch

import checkpoint
import tasks
from configurator import AT_LEAST_1, NON_NEGATIVE, NOT_EMPTY, configure, require
from parallel import autocast_context
from engine import chat_replies

defaults = dict(
    a="",                       # the two checkpoints (run directories or .pt files)
    b="",
    prompts="",                 # a .txt file (a prompt per line) or .jsonl ({"prompt": ...} per line);
                                # '' = the verifiable tasks' held-out prompts
    n=20,                       # at most this many prompts
    votes="votes.jsonl",        # appended to, a record per vote
    max_new_tokens=128,
    temperature=0.0,            # 0 = each model's greedy reply
    seed=1337,                  # the order of A and B, and sampled replies
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="auto",
)


def read_prompts(path, n):
    """Up to n prompts from a .txt file (one per non-empty line) or a .jsonl file of {"prompt": str}."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"prompts file '{path}': {getattr(e, 'strerror', None) or e}")
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                line = json.loads(line)["prompt"]
            except (ValueError, TypeError, KeyError):
                sys.exit(f"{path}:{i}: expected a JSON object with a 'prompt' string")
            if not isinstance(line, str) or not line.strip():
                sys.exit(f"{path}:{i}: 'prompt' must be a non-empty string")
        prompts.append(line)
    if not prompts:
        sys.exit(f"prompts file '{path}' holds no prompt")
    return prompts[:n]


def win_rate(scores, resamples=10_000, seed=0):
    """--b's mean score (1 a win, 0.5 a tie, 0 a loss) and its 95% bootstrap interval over the votes."""
    s = np.asarray(scores, dtype=float)
    means = s[np.random.default_rng(seed).integers(0, len(s), (resamples, len(s)))].mean(1)
    return float(s.mean()), tuple(float(x) for x in np.percentile(means, [2.5, 97.5]))


def ask(label):
    """'a', 'b', 't', or None to stop (q, end of input, Ctrl-C)."""
    while True:
        try:
            answer = input(f"{label} better? [a/b/t for a tie, q to stop] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        if answer in ("a", "b", "t", "q"):
            return None if answer == "q" else answer


def sitting(cfg):
    models = {}
    for side in ("a", "b"):
        try:
            models[side] = checkpoint.load_model(cfg[side], cfg["device"])[:2]
        except ValueError as e:
            sys.exit(str(e))
    if cfg["prompts"]:
        prompts = read_prompts(cfg["prompts"], cfg["n"])
    else:
        prompts = [ex["prompt"] for ex in tasks.make_examples(cfg["n"], "val", cfg["seed"])]
    rng = random.Random(cfg["seed"])
    g = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])
    ctx = autocast_context(cfg["dtype"], cfg["device"].split(":")[0])
    scores, saved = [], 0
    with open(cfg["votes"], "a", encoding="utf-8") as out:
        for i, prompt in enumerate(prompts, 1):
            replies = {}
            try:
                with ctx:
                    for side, (model, enc) in models.items():
                        replies[side] = chat_replies(model, enc, [[{"role": "user", "content": prompt}]],
                                                     max_new_tokens=cfg["max_new_tokens"],
                                                     temperature=cfg["temperature"], generator=g)[0][0]
            except KeyboardInterrupt:
                print()
                break
            shown = ["a", "b"] if rng.random() < 0.5 else ["b", "a"]  # shown[0] is labelled A
            print(f"\n--- {i}/{len(prompts)}\n{prompt}\n\nA: {replies[shown[0]]}\n\nB: {replies[shown[1]]}\n")
            if replies["a"] == replies["b"]:
                print("(the same reply: counted as a tie, not saved)")
                scores.append(0.5)
                continue
            vote = ask("Which is")
            if vote is None:
                break
            if vote == "t":  # a tie is recorded with --a's reply first and equal scores
                chosen, rejected, score = "a", "b", (0.5, 0.5)
            else:
                chosen, rejected = shown if vote == "a" else shown[::-1]
                score = (1.0, 0.0)
            scores.append(0.5 if vote == "t" else float(chosen == "b"))
            if not replies[chosen].strip() or not replies[rejected].strip():
                print("(an empty reply makes no preference record: counted, not saved)")
                continue
            record = {"prompt": prompt, "chosen": replies[chosen], "rejected": replies[rejected],
                      "score_chosen": score[0], "score_rejected": score[1],
                      "chosen_model": cfg[chosen], "rejected_model": cfg[rejected]}
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a vote given is a vote kept, whatever ends the sitting
            saved += 1
    if not scores:
        print("no votes")
        return
    rate, (lo, hi) = win_rate(scores)
    wins_b, ties = sum(s == 1.0 for s in scores), sum(s == 0.5 for s in scores)
    print(f"\n{len(scores)} votes: {cfg['b']} won {wins_b}, {cfg['a']} won {len(scores) - wins_b - ties}, {ties} "
          f"ties. Win rate of {cfg['b']} over {cfg['a']} (a tie counts half): {rate:.3f}, 95% CI [{lo:.3f}, "
          f"{hi:.3f}]; {saved} preference records appended to {cfg['votes']}")


def main():
    cfg = configure(defaults)
    require(cfg, {"a": NOT_EMPTY, "b": NOT_EMPTY, "n": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
                  "temperature": NON_NEGATIVE, "votes": NOT_EMPTY})
    sitting(cfg)


if __name__ == "__main__":
    main()

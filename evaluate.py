"""
Measure a checkpoint: bits per byte and perplexity on a held-out split, multiple-choice log-likelihood
accuracy, exact-match accuracy on the verifiable tasks (greedy and sampled), the diversity of its
samples, and the standard benchmarks as lm-evaluation-harness scores them (benchmarks.py). Prints a
table and writes out_dir/eval.json.

    python evaluate.py --out_dir=out/sft_tiny
    python evaluate.py --out_dir=out/tiny --mc_file=hellaswag_val.jsonl --tasks_n=0
    python evaluate.py "--compare=['out/tiny', 'out/sft_tiny', 'out/dpo_tiny']"   # stages side by side
    python evaluate.py --out_dir=out/pretrain "--benchmarks=['hellaswag', 'arc_easy', 'mmlu']" --benchmark_n=500
    python evaluate.py --out_dir=out/rm_tiny --pairs=data/dpo_demo   # a reward model: accuracy on held-out pairs
    python evaluate.py "--plot=['out/tiny', 'out/dpo_tiny']"       # loss curves to out/*/curves.png
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import benchmarks
import tasks
from configurator import NON_NEGATIVE, configure, one_of, require
import checkpoint
from batches import DatasetError, RewardBatches
from parallel import DTYPES, autocast_context
from engine import chat_replies, loglikelihoods
from tokenizer import render_chat

defaults = dict(
    out_dir="out",              # the checkpoint's directory (eval.json is written there)
    data="data/demo",           # a prepared pretraining dataset: bits per byte on its val.bin
    max_tokens=200_000,         # at most this many val tokens for bits per byte (0 = all)
    mc_file="",                 # JSONL of {context, choices, label}; '' = tasks.choice_examples
    mc_n=200,                   # multiple-choice items when generated
    tasks_n=140,                # held-out task prompts for exact match (split evenly over the tasks)
    tasks=[],                   # task names for exact match ([] = all of tasks.TASKS)
    tasks_split="val",          # 'val', or 'dev' while choosing settings, so the val figures are not tuned on
    samples_n=16,               # sampled replies for the diversity figures
    benchmarks=[],              # standard benchmarks (benchmarks.NAMES: hellaswag, arc_easy, arc_challenge, mmlu, ...)
    benchmarks_dir="data/raw",  # where prepare.py --download=NAME put them: DIR/NAME/<published path>
    benchmark_n=0,              # at most this many items per benchmark (MMLU: per subject); 0 = all
    batch_tokens=16384,         # tokens per forward pass when scoring the benchmarks' choices
    pairs="",                   # a reward model (train.py mode='rm'): a preference dataset (prepare.py --kind=dpo)
                                # whose val pairs it scores: accuracy and margin; it is measured on nothing else
    compare=[],                 # out_dirs of successive stages: evaluate each, print them side by side
    compare_png="compare.png",  # --compare also draws the stages side by side here ('' = no chart)
    reuse=False,                # --compare: take a stage's eval.json if it was made with these settings from
                                # this checkpoint, instead of evaluating again
    plot=[],                    # run dirs (or one): draw each metrics.jsonl to RUN/curves.png
    temperature=1.0,            # for the sampled accuracy and the diversity figures
    seed=1337,
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="auto",
)


def token_bytes(enc, vocab_size):
    """UTF-8 length of each token id; special tokens and unused ids count 0 (they are not text)."""
    n = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, enc.n_vocab)):
        try:
            n[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:
            pass
    for s in enc.special_tokens_set:
        n[enc.encode_single_token(s)] = 0
    return n


@torch.no_grad()
def bits_per_byte(model, enc, ids, device, batch_size=8):
    """Over non-overlapping windows of block_size+1 tokens, each window's tokens after the first are
    predicted: bpb = total nats / (ln 2 * total UTF-8 bytes of the predicted tokens), so models with
    different tokenizers compare; perplexity = exp(nats per predicted token)."""
    T = model.config.block_size
    n_win = (len(ids) - 1) // T
    windows = torch.from_numpy(ids[:n_win * T + 1].astype(np.int64))
    nbytes = torch.from_numpy(token_bytes(enc, model.config.vocab_size))
    nats = tokens = text_bytes = 0.0
    for start in range(0, n_win, batch_size):
        rows = torch.stack([windows[w * T:(w + 1) * T + 1] for w in range(start, min(n_win, start + batch_size))])
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        logits, _ = model(x)
        nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        tokens += y.numel()
        text_bytes += nbytes[y.cpu()].sum().item()
    return {"val_bpb": nats / (math.log(2) * text_bytes), "val_ppl": math.exp(nats / tokens), "val_tokens": int(tokens)}


def multiple_choice(model, enc, items):
    """acc: the choice of highest log-likelihood (the summed log-probability of its tokens, encoded on
    their own, after the context's); acc_norm: of highest log-likelihood per character (HellaSwag's length
    normalization, which keeps long choices from losing for their length)."""
    lls = iter(loglikelihoods(model, [(enc.encode_ordinary(it["context"]), enc.encode_ordinary(c))
                                      for it in items for c in it["choices"]]))
    hit = hit_norm = 0
    for it in items:
        scores = [next(lls) for _ in it["choices"]]
        hit += int(np.argmax(scores)) == it["label"]
        hit_norm += int(np.argmax([s / len(c) for s, c in zip(scores, it["choices"])])) == it["label"]
    return {"mc_acc": hit / len(items), "mc_acc_norm": hit_norm / len(items), "mc_n": len(items)}


@torch.no_grad()
def pair_accuracy(model, data_dir, device, batch_pairs=32):
    """A reward model on every val pair of a prepared preference dataset: the share it ranks the chosen
    reply above the rejected one, and the mean margin r(chosen) - r(rejected)."""
    try:
        pairs = RewardBatches(data_dir, {"block_size": model.config.block_size}, {})
    except DatasetError as e:
        sys.exit(str(e))
    n = len(pairs.splits["val"][1])
    margins = []
    for start in range(0, n, batch_pairs):
        ids = list(range(start, min(n, start + batch_pairs)))
        batch = pairs.batch("val", ids)
        r = model(batch["idx"].to(device), reward_at=batch["last"].to(device))[0].float()
        margins += (r[:len(ids)] - r[len(ids):]).tolist()
    return {"pair_n": n, "pair_accuracy": sum(m > 0 for m in margins) / n, "pair_margin": sum(margins) / n}


def read_choices(path):
    items = []
    if not os.path.isfile(path):
        sys.exit(f"mc_file '{path}' not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    it = json.loads(line)
                    if not 0 <= it["label"] < len(it["choices"]) or not isinstance(it["context"], str):
                        raise ValueError("label out of range")
                except (ValueError, KeyError, TypeError, RecursionError) as e:
                    sys.exit(f"{path}:{lineno}: not a {{context, choices, label}} record ({e})")
                items.append(it)
    return items


@torch.no_grad()
def diversity(model, enc, prompts, temperature, generator):
    """distinct-n: unique n-grams / all n-grams over the sampled replies' tokens; entropy: the mean
    entropy (nats) of the model's next-token distribution at the replies' positions."""
    grams = {1: [], 2: []}
    entropies = []
    replies = chat_replies(model, enc, [[{"role": "user", "content": p}] for p in prompts], temperature=temperature,
                           max_new_tokens=48, generator=generator)
    for p, (reply,) in zip(prompts, replies):
        ids = enc.encode_ordinary(reply)
        for n in grams:
            grams[n] += [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        prompt_ids = render_chat(enc, [{"role": "user", "content": p}], generation_prompt=True)[0]
        seq = (prompt_ids + ids)[-model.config.block_size:]
        if ids:
            logp = model(torch.tensor([seq], device=next(model.parameters()).device))[0][0, -len(ids) - 1:-1]
            logp = logp.float().log_softmax(-1)
            entropies += (-(logp.exp() * logp).sum(-1)).tolist()
    out = {f"distinct_{n}": len(set(g)) / max(1, len(g)) for n, g in grams.items()}
    out["entropy"] = float(np.mean(entropies)) if entropies else 0.0
    return out


class Progress:
    """A line on stderr as each measurement of a checkpoint starts and ends: scoring takes minutes."""

    def __init__(self, name):
        self.name, self.t0 = name, time.time()

    def __call__(self, what):
        print(f"[{self.name}] {what} ({time.time() - self.t0:.0f} s)", file=sys.stderr, flush=True)


SETTINGS = ("pairs", "data", "max_tokens", "mc_file", "mc_n", "tasks_n", "tasks", "tasks_split", "samples_n", "temperature",
            "seed", "dtype", "benchmarks", "benchmarks_dir", "benchmark_n")  # what an eval.json's figures depend on


def eval_path(out_dir):
    return os.path.join(os.path.dirname(out_dir) if out_dir.endswith(".pt") else out_dir, "eval.json")


def made_with(cfg):
    """The settings and the checkpoint (its file's size and time) an eval.json is made with."""
    ckpt = os.path.join(cfg["out_dir"], "ckpt.pt") if os.path.isdir(cfg["out_dir"]) else cfg["out_dir"]
    st = os.stat(ckpt) if os.path.isfile(ckpt) else None
    return {**{k: cfg[k] for k in SETTINGS}, "checkpoint": [st.st_size, st.st_mtime_ns] if st else None}


def evaluate_or_reuse(cfg):
    """evaluate(cfg), or with reuse=True the checkpoint's eval.json if it was made with cfg's settings."""
    try:
        with open(eval_path(cfg["out_dir"])) as f:
            saved = json.load(f)
        if cfg["reuse"] and saved.get("made_with") == json.loads(json.dumps(made_with(cfg))):
            print(f"[{cfg['out_dir']}] reusing its eval.json", file=sys.stderr)
            return saved
    except (OSError, ValueError):
        pass
    return evaluate(cfg)


def evaluate(cfg):
    device = cfg["device"]
    say = Progress(cfg["out_dir"])
    try:
        model, enc, ckpt = checkpoint.load_model(cfg["out_dir"], device)
    except ValueError as e:
        sys.exit(str(e))
    ctx = autocast_context(cfg["dtype"], device.split(":")[0])
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    run = ckpt.get("config", {})
    results, t0 = {"checkpoint": cfg["out_dir"], "mode": run.get("mode"), "init_from": run.get("init_from")}, time.time()
    if model.config.reward_head != bool(cfg["pairs"]):
        sys.exit(f"'{cfg['out_dir']}' is a reward model: give --pairs=DIR, a preference dataset" if cfg["pairs"] == ""
                 else f"--pairs scores a reward model (train.py mode='rm'); '{cfg['out_dir']}' is a policy")
    with ctx:
        if cfg["pairs"]:
            say("reward model accuracy on held-out pairs")
            results.update(pair_accuracy(model, cfg["pairs"], device))
        elif cfg["data"]:
            say("bits per byte on held-out text")
            val = os.path.join(cfg["data"], "val.bin")
            if not os.path.isfile(val):
                sys.exit(f"'{val}' not found: --data names a prepared pretraining dataset ('' to skip)")
            if os.path.getsize(val) % 2 or os.path.getsize(val) < 4:
                sys.exit(f"'{val}' is not a uint16 token file of at least two tokens")
            ids = np.memmap(val, dtype=np.uint16, mode="r")
            results.update(bits_per_byte(model, enc, ids[:cfg["max_tokens"] or len(ids)], device))
        if cfg["mc_n"] or cfg["mc_file"]:
            say("multiple choice")
            items = read_choices(cfg["mc_file"]) if cfg["mc_file"] else tasks.choice_examples(cfg["mc_n"], "val", cfg["seed"])
            results.update(multiple_choice(model, enc, items))
        if cfg["tasks_n"]:
            say(f"exact match on {cfg['tasks_n']} held-out ({cfg['tasks_split']}) task prompts, greedy and sampled")
            held_out = tasks.make_examples(cfg["tasks_n"], cfg["tasks_split"], cfg["seed"],
                                           cfg["tasks"] or tuple(tasks.TASKS))
            greedy = tasks.accuracy(model, enc, held_out)
            sampled = tasks.accuracy(model, enc, held_out, temperature=cfg["temperature"], generator=g)
            results["exact_hits"] = "".join(map(str, greedy.pop("hits")))  # per prompt, for paired tests
            results.update({f"exact_{k}": v for k, v in greedy.items()})
            results["exact_all_sampled"] = sampled["all"]
        if cfg["samples_n"]:
            say(f"diversity of {cfg['samples_n']} samples")
            prompts = [ex["prompt"] for ex in tasks.make_examples(cfg["samples_n"], "val", cfg["seed"] + 1)]
            results.update(diversity(model, enc, prompts, cfg["temperature"], g))
        if cfg["benchmarks"]:
            say(f"benchmarks: {', '.join(cfg['benchmarks'])}")
            try:  # a chat checkpoint is also scored on gsm8k through its chat template
                results["benchmarks"] = benchmarks.evaluate(
                    model, enc, cfg["benchmarks"], cfg["benchmarks_dir"], cfg["benchmark_n"],
                    chat=results["mode"] in ("sft", "dpo", "rl") and "<|im_start|>" in enc.special_tokens_set,
                    batch_tokens=cfg["batch_tokens"])
            except benchmarks.BenchmarkError as e:
                sys.exit(str(e))
    results["seconds"] = round(time.time() - t0, 1)
    results["made_with"] = made_with(cfg)
    say("done")
    with open(eval_path(cfg["out_dir"]) + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(eval_path(cfg["out_dir"]) + ".tmp", eval_path(cfg["out_dir"]))
    return results


def paired_difference(before, after, resamples=10_000, seed=0):
    """How much `after` beats `before` on the same prompts (per-prompt hits, 1 or 0): the difference of
    the accuracies; a 95% paired-bootstrap interval (prompts resampled with replacement, both models'
    hits together); the prompts gained and lost; and McNemar's exact two-sided p-value: were the
    discordant prompts split gained:lost as by a fair coin, i.e. no real difference?"""
    a, b = np.asarray(before, dtype=np.int8), np.asarray(after, dtype=np.int8)
    rng = np.random.default_rng(seed)
    diffs = (b - a)[rng.integers(0, len(a), (resamples, len(a)))].mean(1)  # a row of prompts per resample
    gained, lost = int(((b == 1) & (a == 0)).sum()), int(((a == 1) & (b == 0)).sum())
    n, k = gained + lost, min(gained, lost)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float(b.mean() - a.mean()), "ci95": (float(lo), float(hi)), "gained": gained, "lost": lost,
            "p_mcnemar": p}


def final_val_metrics(out_dir):
    """The last eval record of a run's metrics.jsonl (DPO's held-out reward accuracy lives there)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    return evals[-1] if evals else {}


def plot_run(run_dir):
    """Train loss per logged step, train and val loss per eval; for DPO and reward-model runs the held-out
    reward margins and accuracies; for RL runs the reward per step, pass@1 on held-out prompts and the KL
    to the reference: against the iteration, to run_dir/curves.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plotting needs matplotlib, an optional dependency: pip install matplotlib")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"'{path}' not found: --plot takes run directories that train.py wrote")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except ValueError as e:
        sys.exit(f"'{path}' is not JSON lines ({e})")
    steps = [r for r in records if "loss" in r and "skipped" not in r]
    evals = [r for r in records if "val_loss" in r]
    dpo = any("rewards/margins" in r for r in evals)
    rl = any("pass@1" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if dpo or rl else 1, figsize=(12 if dpo or rl else 7, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, label="train (step)")
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        ax.plot([r["iter"] for r in evals], [r[key] for r in evals], style, label=key.replace("_", " "))
    ax.set(xlabel="iteration", ylabel="loss", title=run_dir)
    ax.legend()
    if dpo:
        ax = axes[0][1]
        for key in ("rewards/margins", "rewards/accuracies"):
            ax.plot([r["iter"] for r in evals], [r[key] for r in evals], "o-", label=f"val {key}")
        ax.set(xlabel="iteration", title="preference rewards (held-out pairs)")
        ax.legend()
    if rl:
        ax = axes[0][1]
        ax.plot([r["iter"] for r in steps], [r["reward"] for r in steps], lw=1, alpha=0.6, label="reward (step)")
        ax.plot([r["iter"] for r in evals], [r["pass@1"] for r in evals], "o-", label="val pass@1 (sampled)")
        ax.set(xlabel="iteration", ylabel="reward", title="RL: reward, and KL to the reference")
        ax.legend(loc="upper left")
        kl = ax.twinx()
        kl.plot([r["iter"] for r in steps], [r["kl"] for r in steps], "C3", lw=1, alpha=0.6, label="KL per reply (step)")
        kl.set_ylabel("KL (nats per reply)")
        kl.legend(loc="upper right")
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def bars(ax, names, values):
    """Grouped bars: one group per key of values ({label: [value per stage]}), one bar per stage."""
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(values))]
        ax.bar(xs, [v[i] for v in values.values()], width, label=name)
    ax.set_xticks(range(len(values)), [t.replace("_", " ") for t in values], rotation=20)
    ax.legend()


def plot_compare(names, columns, path):
    """The stages side by side in one PNG: greedy exact match per task and pooled (bars), val bits per byte
    of the pretraining text, and the benchmarks if they were scored. Returns what it drew: {task or 'all'
    or 'val_bpb' or benchmark row: [value per stage]}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    task_names = [t for t in tasks.TASKS if any(f"exact_{t}" in c for c in columns)]
    drawn = {t: [c.get(f"exact_{t}", 0.0) for c in columns] for t in task_names + ["all"]}
    bench = {k: [c.get(k, 0.0) for c in columns] for k in dict.fromkeys(k for c in columns for k in benchmark_figures(c))}
    fig, axes = plt.subplots(1, 3 if bench else 2, figsize=(19 if bench else 13, 4),
                             gridspec_kw={"width_ratios": [4, 1, 4] if bench else [4, 1]})
    left, right = axes[0], axes[1]
    bars(left, names, drawn)
    left.set(ylabel="exact match, greedy", title="held-out task prompts, per task and pooled", ylim=(0, 1))
    if bench:
        bars(axes[2], names, bench)
        axes[2].set(title="standard benchmarks (lm-evaluation-harness's scoring)", ylim=(0, 1))
        drawn.update(bench)
    if all(isinstance(c.get("val_bpb"), float) for c in columns):
        drawn["val_bpb"] = [c["val_bpb"] for c in columns]
        right.bar(range(len(names)), drawn["val_bpb"], color=[f"C{i}" for i in range(len(names))])
        right.set_xticks(range(len(names)), [os.path.basename(n.rstrip("/")) for n in names], rotation=20)
        right.set(title="val bits/byte (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def benchmark_figures(result):
    """{row label: value} of a checkpoint's benchmarks: acc and acc_norm (MMLU: acc, as it is reported),
    GSM8K's exact match with the strict and the flexible extraction."""
    out = {}
    for name, r in result.get("benchmarks", {}).items():
        if "acc" in r:
            out[f"{name} acc"] = r["acc"]
            if not name.startswith("mmlu"):
                out[f"{name} acc_norm"] = r["acc_norm"]
        else:
            out[f"{name} exact match, strict"] = r["exact_match_strict"]
            out[f"{name} exact match, flexible"] = r["exact_match_flexible"]
    return out


ROWS = [("val bits/byte (pretraining text)", "val_bpb"), ("multiple choice acc (norm)", "mc_acc_norm"),
        ("task exact match, greedy", "exact_all"), ("task exact match, sampled", "exact_all_sampled"),
        ("reward accuracy, held-out pairs", "rewards/accuracies"), ("RL: KL to the reference per reply", "kl"),
        ("distinct-2 of samples", "distinct_2"),
        ("mean entropy of samples (nats)", "entropy")]


def main():
    cfg = configure(defaults)
    require(cfg, {"max_tokens": NON_NEGATIVE, "mc_n": NON_NEGATIVE, "tasks_n": NON_NEGATIVE,
                  "samples_n": NON_NEGATIVE, "temperature": NON_NEGATIVE, "tasks": tasks.NAMES_RULE,
                  "tasks_split": one_of("val", "dev"), "dtype": one_of(*DTYPES), "benchmark_n": NON_NEGATIVE,
                  "batch_tokens": (lambda v: v >= 1, ">= 1"),
                  "benchmarks": (lambda v: set(v) <= set(benchmarks.NAMES),
                                 f"a list of benchmark names from {', '.join(benchmarks.NAMES)}")})
    if cfg["plot"]:
        for run in cfg["plot"]:
            print(f"wrote {plot_run(run)}")
        return
    if not cfg["compare"]:
        results = evaluate(cfg)
        for k, v in {**results, **benchmark_figures(results)}.items():
            if k not in ("exact_hits", "benchmarks", "made_with"):  # per prompt and per item: eval.json keeps them
                print(f"{k:<36}{v:.4f}" if isinstance(v, float) else f"{k:<36}{v}")
        return
    columns = [{**evaluate_or_reuse({**cfg, "out_dir": d}), **final_val_metrics(d)} for d in cfg["compare"]]
    print("\n" + f"{'':<34}" + "".join(f"{d:>16}" for d in cfg["compare"]))
    for c in columns:
        c.update(benchmark_figures(c))
    labels = ROWS + [(k, k) for k in dict.fromkeys(k for c in columns for k in benchmark_figures(c))]
    for label, key in labels:
        cells = [f"{c[key]:>16.3f}" if isinstance(c.get(key), float) else f"{'-':>16}" for c in columns]
        if any(isinstance(c.get(key), float) for c in columns):  # measured for some stage
            print(f"{label:<34}" + "".join(cells))
    for d, c in zip(cfg["compare"], columns):
        per_task = ", ".join(f"{k[6:]} {v:.2f}" for k, v in c.items() if k.startswith("exact_") and k[6:] in tasks.TASKS)
        if per_task:
            print(f"{d}: {per_task}")
    stages = list(zip(cfg["compare"], columns))
    for i, (d1, c1) in enumerate(stages[1:], 1):  # each stage against the one it was trained from, else the column before
        start = str(c1.get("init_from") or "")
        start = os.path.normpath(os.path.dirname(start) if start.endswith(".pt") else start)
        d0, c0 = next(((d, c) for d, c in stages[:i] if os.path.normpath(d) == start), stages[i - 1])
        if c0.get("exact_hits") and len(c0["exact_hits"]) == len(c1.get("exact_hits", "")):
            r = paired_difference(list(map(int, c0["exact_hits"])), list(map(int, c1["exact_hits"])))
            lo, hi = r["ci95"]
            print(f"{d1} vs {d0}, greedy exact match on the same {len(c0['exact_hits'])} prompts: "
                  f"{100 * r['diff']:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}] (paired bootstrap); "
                  f"{r['gained']} gained, {r['lost']} lost, McNemar p = {r['p_mcnemar']:.2g}")
        for name, b0 in c0.get("benchmarks", {}).items():
            b1 = c1.get("benchmarks", {}).get(name)
            if b1 and b0["n"] == b1["n"]:
                r = paired_difference(benchmarks.hits(b0), benchmarks.hits(b1))
                lo, hi = r["ci95"]
                metric = "acc" if "picked" in b0 else "exact match, strict"
                print(f"{d1} vs {d0}, {name} {metric} on the same {b0['n']} items: {100 * r['diff']:+.1f} points, "
                      f"95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]; {r['gained']} gained, {r['lost']} lost, "
                      f"McNemar p = {r['p_mcnemar']:.2g}")
    if cfg["compare_png"]:
        try:
            plot_compare(cfg["compare"], columns, cfg["compare_png"])
            print(f"wrote {cfg['compare_png']}")
        except ImportError:
            print("no chart: it needs matplotlib (pip install matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()

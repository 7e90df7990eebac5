"""
Chat data for prepare.py's kind='sft' and kind='dpo' (prepare.py imports this module only for those):
instruction records in the Alpaca, ShareGPT/Vicuna and OpenAI-messages formats, preference records
(plain or TRL's conversational form), on-policy preference pairs sampled from a model and judged by
the verifiable tasks of tasks.py, all rendered with the chat template of tokenizer.py.

Files written (into the directory prepare.py hands over):
  sft: {train,val}.bin (uint16 tokens), {train,val}.mask.bin (uint8, 1 where the loss counts),
       {train,val}.idx (int64 offsets: example i is [idx[i], idx[i+1]))
  dpo: {train,val}.bin (uint16: each pair's prompt, chosen and rejected tokens in a row),
       {train,val}.idx (int64 rows: prompt start, chosen start, rejected start, end)
"""
import glob
import json
import os
import re
import sys
from collections import Counter

import numpy as np

from tokenizer import chat_replies, check_uint16, inline_spec, load_tokenizer, render_chat, save_bpe


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def turn(m, role_key="role", content_key="content"):
    if not isinstance(m, dict) or role_key not in m or content_key not in m:
        raise ValueError(f"a turn must be an object with '{role_key}' and '{content_key}', not {str(m)[:40]!r}")
    return {"role": m[role_key], "content": m[content_key]}


def turns(value, field):
    if not isinstance(value, list):
        raise ValueError(f"'{field}' must be a list of turns")
    return value


def to_messages(record):
    """An Alpaca, ShareGPT/Vicuna or OpenAI-messages record (or a bare list of messages) as
    [{role, content}], checked: known roles, no empty turn, ends with an assistant turn. Raises
    ValueError saying what is wrong."""
    if isinstance(record, list):
        msgs = [turn(m) for m in record]
    elif not isinstance(record, dict):
        raise ValueError(f"a record must be an object or a list of messages, not {type(record).__name__}")
    elif "messages" in record:
        msgs = [turn(m) for m in turns(record["messages"], "messages")]
    elif "conversations" in record or "conversation" in record:
        key = "conversations" if "conversations" in record else "conversation"
        msgs = []
        for t in turns(record[key], key):
            if isinstance(t, dict) and "from" in t:
                if t["from"] not in SHAREGPT_ROLES:
                    raise ValueError(f"unknown role '{t['from']}'")
                msgs.append({**turn(t, "from", "value"), "role": SHAREGPT_ROLES[t["from"]]})
            else:
                msgs.append(turn(t))
    elif "instruction" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"Alpaca record without its '{key}' field")
        for key in ("instruction", "input", "output", "system"):
            if not isinstance(record.get(key, ""), str):
                raise ValueError(f"Alpaca '{key}' must be a string, not {type(record[key]).__name__}")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        msgs = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + \
            [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ValueError("not an Alpaca (instruction, output), ShareGPT (conversations) or messages record")
    return check_turns(msgs, last="assistant")


def check_turns(msgs, last):
    """msgs, if every role is known, no turn is empty and the last turn is `last`'s."""
    for m in msgs:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role '{m['role']}'")
        if not isinstance(m["content"], str):
            raise ValueError(f"a {m['role']} turn's content must be a string, not {type(m['content']).__name__}")
        if not m["content"].strip():
            raise ValueError(f"empty {m['role']} turn")
    if not msgs or msgs[-1]["role"] != last:
        raise ValueError(f"the conversation does not end with a{'n' if last == 'assistant' else ''} {last} turn")
    return msgs


def to_pair(record):
    """(prompt messages, chosen reply, rejected reply) of a preference record: plain strings, or TRL's
    conversational form (prompt a message list, chosen and rejected one-assistant-message lists)."""
    if not isinstance(record, dict):
        raise ValueError(f"a preference record must be an object, not {type(record).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"missing field '{key}'")
    prompt = record["prompt"]
    msgs = check_turns([{"role": "user", "content": prompt}] if isinstance(prompt, str) else
                       [turn(m) for m in turns(prompt, "prompt")], last="user")
    replies = []
    for key in ("chosen", "rejected"):
        reply = record[key]
        if isinstance(reply, list):
            if len(reply) != 1:
                raise ValueError(f"'{key}' must hold one assistant message")
            reply = check_turns([turn(reply[0])], "assistant")[0]["content"]
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError(f"empty '{key}' reply")
        replies.append(reply)
    if replies[0] == replies[1]:
        raise ValueError("the chosen and rejected replies are the same: the pair teaches nothing")
    return msgs, replies[0], replies[1]


def read_records(path, replaced=None):
    """(location, record) from a JSON array file ('file[i]') or a JSONL file ('file:line'). Lines split
    on '\n' only: U+2028 and friends are legal inside JSON strings. A UTF-8 BOM is dropped; bytes that
    are not UTF-8 become U+FFFD, counted per file in `replaced`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        sys.exit(f"{path}: {e.strerror}")
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad and replaced is not None:
        replaced[path] += bad
    if path.endswith(".jsonl"):
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield f"{path}:{lineno}", line
        return
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as e:
        sys.exit(f"{path}: not valid JSON ({'nested too deeply' if isinstance(e, RecursionError) else e})")
    if not isinstance(records, list):
        sys.exit(f"{path}: expected a JSON array of records")
    for i, r in enumerate(records):
        yield f"{path}[{i}]", r


def on_policy_pairs(cfg, model, enc, split, n, stats):
    """Preference pairs on the tasks' prompts, judged by each task's checker: the model's greedy answer
    first, then samples_per_prompt sampled ones; the first correct answer is chosen and the first
    incorrect one rejected. So a wrong greedy answer, the one greedy evaluation scores, is always the
    rejected reply. A prompt the model always gets right gives no pair; one it never gets right gives
    the reference answer as chosen, or no pair with reference_chosen=False (then both replies of every
    pair are the model's own)."""
    import tasks
    import torch
    g = torch.Generator().manual_seed(cfg["seed"])
    pairs = []
    examples = tasks.make_examples(n, split, cfg["seed"], cfg["tasks"] or tuple(tasks.TASKS))
    prompts = [ex["messages"][:1] for ex in examples]
    print(f"greedy and {cfg['samples_per_prompt']} sampled answers to each of {n} {split} prompts", flush=True)
    greedy = chat_replies(model, enc, prompts, max_new_tokens=64)
    sampled = chat_replies(model, enc, prompts, num_samples=cfg["samples_per_prompt"], max_new_tokens=64,
                           temperature=cfg["sample_temperature"], generator=g)
    for i, (ex, first, samples) in enumerate(zip(examples, greedy, sampled)):
        replies = first + samples  # the greedy answer first
        right = [tasks.check(ex["answer"], r) for r in replies]
        good = [r for r, ok in zip(replies, right) if ok]
        bad = [r for r, ok in zip(replies, right) if not ok]
        stats[f"{split}_correct_greedy"] += right[0]
        stats[f"{split}_correct_samples"] += sum(right[1:])
        if not bad:
            stats[f"{split}_all_correct"] += 1
            continue
        if not good and not cfg["reference_chosen"]:
            stats[f"{split}_no_correct_answer"] += 1
            continue
        stats[f"{split}_reference_chosen"] += not good
        pairs.append((f"tasks:{split}:{i}", (prompts[i], good[0] if good else ex["answer"], bad[0])))
    return pairs


def chat_items(cfg, enc, stats, replaced):
    """{'train': [...], 'val': [...]} of (location, record) from every source: records of files split at
    random by val_fraction; embedded:tasks gives task examples (sft) or on-policy pairs (dpo) from the
    tasks' own train and held-out val items."""
    out = {"train": [], "val": []}
    rng = np.random.default_rng(cfg["seed"])
    for name, where in cfg["sources"].items():
        if where == "embedded:tasks":
            n = cfg["task_examples"] if cfg["kind"] == "sft" else cfg["pair_prompts"]
            if cfg["kind"] == "dpo":
                model = load_policy(cfg["from_ckpt"])
            for split, count in (("train", n), ("val", max(1, n // 10))):
                if cfg["kind"] == "sft":
                    import tasks
                    out[split] += [(f"tasks:{split}:{i}", ex["messages"]) for i, ex in enumerate(
                        tasks.make_examples(count, split, cfg["seed"], cfg["tasks"] or tuple(tasks.TASKS)))]
                else:
                    out[split] += on_policy_pairs(cfg, model, enc, split, count, stats)
            continue
        paths = sorted(glob.glob(where)) or sys.exit(f"source '{where}' matches no files")
        for path in paths:
            for loc, rec in read_records(path, replaced):
                out["val" if rng.random() < cfg["val_fraction"] else "train"].append((loc, rec))
    return out


def render_sft(enc, rec, cfg, notes):
    """(ids, mask) of a conversation record (or a message list). One longer than block_size is an error,
    or with truncate=True cut to its longest prefix of whole turns that ends with an assistant turn and
    fits (counted in notes['truncated'])."""
    msgs = to_messages(rec)
    ids, mask = render_chat(enc, msgs)
    cut = len(msgs)
    while len(ids) - 1 > cfg["block_size"] and cfg["truncate"]:
        cut = max((i for i in range(1, cut) if msgs[i - 1]["role"] == "assistant"), default=0)
        if not cut:
            break
        ids, mask = render_chat(enc, msgs[:cut])
    if len(ids) - 1 > cfg["block_size"]:
        raise ValueError(f"{len(ids)} tokens, longer than block_size={cfg['block_size']} + 1"
                         + ("" if cfg["truncate"] else " (truncate=True keeps the turns that fit)"))
    notes["truncated"] += cut < len(msgs)
    return ids, mask


def render_pair(enc, rec, cfg, notes=None):
    """(prompt ids ending in the generation prompt, chosen ids, rejected ids); replies end in <|im_end|>."""
    msgs, chosen, rejected = rec if isinstance(rec, tuple) else to_pair(rec)
    prompt, _ = render_chat(enc, msgs, generation_prompt=True)
    end = enc.encode_single_token("<|im_end|>")
    c, r = enc.encode_ordinary(chosen) + [end], enc.encode_ordinary(rejected) + [end]
    if len(prompt) + max(len(c), len(r)) - 1 > cfg["block_size"]:
        raise ValueError(f"{len(prompt) + max(len(c), len(r))} tokens, longer than block_size={cfg['block_size']} + 1")
    return prompt, c, r


def render_all(items, render, cfg, skipped):
    """render(record) for each item; a bad record stops the run naming its location, or is counted."""
    out = []
    for loc, rec in items:
        try:
            out.append(render(json.loads(rec) if isinstance(rec, str) else rec))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            reason = (f"missing field {e}" if isinstance(e, KeyError) else
                      "JSON nested too deeply" if isinstance(e, RecursionError) else str(e))
            if cfg["on_error"] != "skip":
                sys.exit(f"{loc}: {reason} (set on_error='skip' to skip such records)")
            skipped[re.sub(r"\d+ tokens", "N tokens", reason.split(" (")[0])] += 1
    return out


def load_policy(path):
    """The model of a checkpoint, to sample from (eval mode, CPU)."""
    import checkpoint
    try:
        return checkpoint.load_model(path)[0]
    except ValueError as e:
        sys.exit(f"from_ckpt: {e} (on-policy pairs sample from an SFT model)")


def tokenizer_of(path):
    """The inline tokenizer spec of a prepared dataset (its meta.json) or of a checkpoint."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")):
        try:
            with open(os.path.join(path, "meta.json")) as f:
                return inline_spec(json.load(f)["tokenizer"], path)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            sys.exit(f"tokenizer_from: '{path}/meta.json' holds no usable tokenizer ({type(e).__name__}: {e})")
    ckpt = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if os.path.isfile(ckpt):
        import torch
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=True)["tokenizer"]
        except Exception as e:  # noqa: BLE001 - not a checkpoint, truncated, or without a tokenizer
            sys.exit(f"tokenizer_from: '{ckpt}' is not a checkpoint with a tokenizer ({type(e).__name__}: {e})")
    sys.exit(f"tokenizer_from='{path}' is neither a prepared dataset nor a checkpoint")


def write_sft_split(examples, tmp_dir, split):
    """tokens (uint16), loss mask (uint8) and int64 offsets: example i is [idx[i], idx[i+1])."""
    ids = np.array([t for e in examples for t in e[0]], dtype=np.uint16)
    mask = np.array([m for e in examples for m in e[1]], dtype=np.uint8)
    offsets = np.cumsum([0] + [len(e[0]) for e in examples], dtype=np.int64)
    ids.tofile(os.path.join(tmp_dir, f"{split}.bin"))
    mask.tofile(os.path.join(tmp_dir, f"{split}.mask.bin"))
    offsets.tofile(os.path.join(tmp_dir, f"{split}.idx"))
    return {"examples": len(examples), "tokens": int(len(ids)), "assistant_tokens": int(mask.sum())}


def write_dpo_split(pairs, tmp_dir, split):
    """tokens (uint16) of each pair's prompt, chosen and rejected replies in a row, and an int64 table
    of (prompt start, chosen start, rejected start, end) per pair."""
    rows, pos = [], 0
    for p, c, r in pairs:
        rows.append((pos, pos + len(p), pos + len(p) + len(c), pos + len(p) + len(c) + len(r)))
        pos = rows[-1][3]
    np.array([t for pair in pairs for part in pair for t in part], dtype=np.uint16).tofile(
        os.path.join(tmp_dir, f"{split}.bin"))
    np.array(rows, dtype=np.int64).reshape(-1, 4).tofile(os.path.join(tmp_dir, f"{split}.idx"))
    return {"pairs": len(pairs), "tokens": pos}


def prepare_chat(cfg, tmp_dir):
    """kind='sft' (conversations) or 'dpo' (preference pairs), in the chat template, written into
    tmp_dir (prepare.py moves it into place). Returns a one-line summary."""
    where = cfg["from_ckpt"] or cfg["tokenizer_from"]
    spec = tokenizer_of(where)
    enc = load_tokenizer(spec)
    try:
        check_uint16(enc)
    except ValueError as e:
        sys.exit(f"the tokenizer of '{where}' {e}")
    stats, skipped, notes, replaced = Counter(), Counter(), Counter(), Counter()
    items = chat_items(cfg, enc, stats, replaced)
    for path, n in replaced.items():
        print(f"warning: {path}: {n} bytes that are not UTF-8 became U+FFFD", file=sys.stderr)
    render, write = (render_sft, write_sft_split) if cfg["kind"] == "sft" else (render_pair, write_dpo_split)
    records = {split: render_all(items[split], lambda rec: render(enc, rec, cfg, notes), cfg, skipped)
               for split in ("train", "val")}
    if not records["train"] or not records["val"]:
        sys.exit(f"no {'train' if not records['train'] else 'val'} examples (val_fraction={cfg['val_fraction']})")
    counts = {split: write(records[split], tmp_dir, split) for split in ("train", "val")}
    if "ranks" in spec:  # a trained BPE travels as a file beside meta.json, as for pretraining data
        save_bpe(spec, os.path.join(tmp_dir, "tokenizer.bpe"))
        spec = {"kind": "bpe", "path": "tokenizer.bpe"}
    meta = {"kind": cfg["kind"], "vocab_size": enc.n_vocab, "tokenizer": spec,
            "special_tokens": {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)},
            **{f"{split}_{k}": v for split, c in counts.items() for k, v in c.items()},
            "skipped": dict(skipped), "truncated": notes["truncated"], "replaced_bytes": dict(replaced),
            **({"sampling": dict(stats)} if stats else {}), "config": cfg}
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return (", ".join(f"{s} {c}" for s, c in counts.items()) + (f"; sampling {dict(stats)}" if stats else "")
            + (f"; skipped {dict(skipped)}" if skipped else "") + (f"; truncated {notes['truncated']}"
                                                                   if notes["truncated"] else ""))


def convert_file(cfg):
    """--convert=IN --convert_out=OUT: Alpaca/ShareGPT/messages records of IN as messages JSONL."""
    if not cfg["convert_out"].strip():
        sys.exit("convert_out: name the JSONL file to write")
    tmp = cfg["convert_out"] + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for loc, rec in read_records(cfg["convert"]):
                try:
                    msgs = to_messages(json.loads(rec) if isinstance(rec, str) else rec)
                except (ValueError, KeyError, TypeError, RecursionError) as e:
                    sys.exit(f"{loc}: {e}")
                out.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    except BaseException as e:  # a failed conversion leaves no partial file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            sys.exit(f"convert_out '{cfg['convert_out']}': {e.strerror}")
        raise
    os.replace(tmp, cfg["convert_out"])
    print(f"wrote {cfg['convert_out']}")

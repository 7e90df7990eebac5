"""
Chat data for prepare.py's kind='sft' and kind='dpo' (prepare.py imports this module only for those):
instruction records in the Alpaca, ShareGPT/Vicuna and OpenAI-messages formats, preference records
(plain, TRL's conversational form, or whole conversations sharing their prompt, as UltraFeedback's), and
on-policy preference pairs sampled from a model and judged by the verifiable tasks of tasks.py, all
rendered with the chat template of tokenizer.py. Files are read as .json arrays, .jsonl (and .jsonl.gz)
lines or .parquet rows, one unit of work at a time in worker processes (sources.py), so a dataset of any
size streams; each record goes to val by a seeded hash of where it is (its source, file name and
position), whatever the number of workers.

Files written (into the directory prepare.py hands over):
  sft: {train,val}.bin (uint16 tokens), {train,val}.mask.bin (uint8, 1 where the loss counts),
       {train,val}.idx (int64 offsets: example i is [idx[i], idx[i+1]))
  dpo: {train,val}.bin (uint16: each pair's prompt, chosen and rejected tokens in a row),
       {train,val}.idx (int64 rows: prompt start, chosen start, rejected start, end)
"""
import hashlib
import json
import os
import re
import shutil
import sys
import zlib
from collections import Counter

import numpy as np

from sources import DataError, hashed_fraction, in_workers, jsonl_lines, list_units, mix_plan, mix_repeats
from tokenizer import check_uint16, inline_spec, load_tokenizer, render_chat, save_bpe

PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, RecursionError)  # a record that is not one

# ----------------------------------------------------------------------------- records: formats


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
            value = record.get(key, "")
            if not isinstance(value, str) and not (value is None and key in ("input", "system")):  # null: empty
                raise ValueError(f"Alpaca '{key}' must be a string, not {type(value).__name__}")
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


def to_pair(record, min_score_margin=0.0):
    """(prompt messages, chosen reply, rejected reply) of a preference record: plain strings; TRL's
    conversational form (prompt a message list, chosen and rejected one-assistant-message lists); or
    chosen and rejected as whole conversations that share their turns before the reply, as UltraFeedback's
    (the prompt field, if a string, must be that shared user turn). With score_chosen and score_rejected,
    a pair whose margin is below min_score_margin, or not above 0 (a tie is no preference), raises LowMargin."""
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
            conversation = [turn(m) for m in reply]
            if len(conversation) > 1 and conversation[:-1] != msgs:
                raise ValueError(f"'{key}': its turns before the reply are not the prompt")
            if not conversation:
                raise ValueError(f"'{key}' must hold one assistant message")
            reply = check_turns(conversation[-1:], "assistant")[0]["content"]
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError(f"empty '{key}' reply")
        replies.append(reply)
    if replies[0] == replies[1]:
        raise ValueError("the chosen and rejected replies are the same: the pair teaches nothing")
    if record.get("score_chosen") is not None and record.get("score_rejected") is not None:
        if not all(isinstance(record[k], (int, float)) for k in ("score_chosen", "score_rejected")):
            raise ValueError("'score_chosen' and 'score_rejected' must be numbers")
        margin = record["score_chosen"] - record["score_rejected"]
        if margin <= 0 or margin < min_score_margin:
            raise LowMargin
    return msgs, replies[0], replies[1]


class LowMargin(Exception):
    """A preference pair whose scores are closer than min_score_margin: noisy, so it is left out."""

# ----------------------------------------------------------------------------- records: reading them


def unit_records(unit, stats, kind="sft"):
    """(location, record) of each record of a unit of work (sources.list_units): 'file[i]' of a JSON array
    file, 'file:line' of a .jsonl line (the raw line: it is parsed with the record), 'file:row' of a parquet
    row. A UTF-8 BOM is dropped; bytes that are not UTF-8 become U+FFFD, counted per file in
    stats['replaced_bytes']; a file without a record is listed in stats['empty_files']."""
    for path in unit["paths"]:
        n = 0
        try:
            if unit["kind"] == "parquet":
                records = parquet_rows(path, kind)
            elif unit["kind"].startswith("jsonl"):
                records = jsonl_records(path, unit.get("range"), stats)
            else:
                records = json_array(path, stats)
            for n, record in enumerate(records, 1):
                yield record
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot be read ({e})") from None
        if not n and not unit.get("range", (0,))[0]:
            stats["empty_files"].append(path)


def read_records(path, replaced=None):
    """(location, record) of every record of one file (json, jsonl or parquet); replaced counts the bytes
    that are not UTF-8 per file."""
    stats = {"replaced_bytes": Counter(), "empty_files": []}
    kind = "parquet" if path.endswith(".parquet") else "jsonl" if path.endswith((".jsonl", ".jsonl.gz")) else "json"
    yield from unit_records({"kind": kind, "paths": [path]}, stats, "sft")
    if replaced is not None:
        replaced.update(stats["replaced_bytes"])


def decoded(raw, path, stats):
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad:
        stats["replaced_bytes"][path] += bad
    return text


def json_array(path, stats):
    with open(path, "rb") as f:
        text = decoded(f.read(), path, stats).removeprefix("\ufeff")
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({'nested too deeply' if isinstance(e, RecursionError) else e})")
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records")
    for i, r in enumerate(records):
        yield f"{path}[{i}]", r


def jsonl_records(path, byte_range, stats):
    """The non-blank lines of a .jsonl file (or of those that start inside byte_range), as text."""
    for lineno, line in jsonl_lines(path, byte_range):
        text = decoded(line, path, stats)
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        if text.strip():
            yield f"{path}:{lineno}", text.rstrip("\n")


COLUMNS = {"sft": (("messages",), ("conversations",), ("conversation",), ("instruction", "output")),
           "dpo": (("prompt", "chosen", "rejected"),)}  # the columns a record of each kind needs, one set of them


def parquet_rows(path, kind):
    """Rows as dicts of their columns, one row group at a time (pyarrow is imported only here), once the
    columns are those of a kind's records."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if not any(set(needed) <= set(names) for needed in COLUMNS[kind]):
            expected = " or ".join(", ".join(needed) for needed in COLUMNS[kind])
            raise DataError(f"{path}: not {kind} records: expected the columns {expected}; found {', '.join(names)}")
        row = 0
        for g in range(pf.num_row_groups):
            for record in pf.read_row_group(g).to_pylist():
                row += 1
                yield f"{path}:{row}", record
    except pyarrow.ArrowException as e:
        raise OSError(f"not a readable parquet file: {e}") from e

# ----------------------------------------------------------------------------- rendering


def render_sft(enc, rec, cfg, notes):
    """(ids, mask) of a conversation record (or a message list), or None if it is longer than block_size
    and too_long='drop' (counted in notes['dropped']). Longer than block_size is an error, or with
    too_long='truncate' the conversation is cut to its longest prefix of whole turns that ends with an
    assistant turn and fits (counted in notes['truncated'])."""
    msgs = to_messages(rec)
    ids, mask = render_chat(enc, msgs)
    cut = len(msgs)
    while len(ids) - 1 > cfg["block_size"] and cfg["too_long"] == "truncate":
        cut = max((i for i in range(1, cut) if msgs[i - 1]["role"] == "assistant"), default=0)
        if not cut:
            break
        ids, mask = render_chat(enc, msgs[:cut])
    if len(ids) - 1 > cfg["block_size"]:
        if cfg["too_long"] == "drop":
            notes["dropped"] += 1
            return None
        raise ValueError(f"{len(ids)} tokens, longer than block_size={cfg['block_size']} + 1"
                         + (" (too_long='truncate' keeps the turns that fit, 'drop' leaves it out)"
                            if cfg["too_long"] == "error" else ""))
    notes["truncated"] += cut < len(msgs)
    return ids, mask


def render_pair(enc, rec, cfg, notes=None):
    """(prompt ids ending in the generation prompt, chosen ids, rejected ids); replies end in <|im_end|>.
    None for a pair longer than block_size with too_long='drop', or below min_score_margin (counted)."""
    notes = Counter() if notes is None else notes
    try:
        msgs, chosen, rejected = rec if isinstance(rec, tuple) else to_pair(rec, cfg["min_score_margin"])
    except LowMargin:
        notes["low_margin"] += 1
        return None
    prompt, _ = render_chat(enc, msgs, generation_prompt=True)
    end = enc.encode_single_token("<|im_end|>")
    c, r = enc.encode_ordinary(chosen) + [end], enc.encode_ordinary(rejected) + [end]
    if len(prompt) + max(len(c), len(r)) - 1 > cfg["block_size"]:
        if cfg["too_long"] == "drop":
            notes["dropped"] += 1
            return None
        raise ValueError(f"{len(prompt) + max(len(c), len(r))} tokens, longer than block_size={cfg['block_size']} + 1"
                         " (too_long='drop' leaves such pairs out)")
    return prompt, c, r


def rendered(items, render, cfg, skipped):
    """(location, render(record)) for each (location, record); a bad record raises DataError naming its
    location, or is counted in skipped. A record a policy leaves out (render gives None) is not yielded."""
    for loc, rec in items:
        try:
            example = render(json.loads(rec) if isinstance(rec, str) else rec)
        except PARSE_ERRORS as e:
            reason = (f"missing field {e}" if isinstance(e, KeyError) else
                      "JSON nested too deeply" if isinstance(e, RecursionError) else str(e))
            if cfg["on_error"] != "skip":
                raise DataError(f"{loc}: {reason} (set on_error='skip' to skip such records)") from None
            skipped[re.sub(r"\d+ tokens", "N tokens", reason.split(" (")[0])] += 1
            continue
        if example is not None:
            yield loc, example


# ----------------------------------------------------------------------------- the pipeline


def prepare_chat(cfg, tmp_dir):
    """kind='sft' (conversations) or 'dpo' (preference pairs), in the chat template, written into tmp_dir
    (prepare.py moves it into place): the files' units in worker processes, embedded:tasks here, then
    the splits concatenated, each source's train examples repeated or subsampled by the mix. Returns a
    one-line summary."""
    where = cfg["from_ckpt"] or cfg["tokenizer_from"]
    spec = tokenizer_of(where)
    enc = load_tokenizer(spec)
    try:
        check_uint16(enc)
    except ValueError as e:
        raise DataError(f"the tokenizer of '{where}' {e}") from None
    work = os.path.join(tmp_dir, "work")
    os.makedirs(work, exist_ok=True)
    files = {name: src for name, src in cfg["sources"].items() if src != "embedded:tasks"}
    units = list_units({**cfg, "sources": files}) if files else []
    workers = min(cfg["num_workers"] or os.cpu_count(), max(1, len(units)))
    tasks = [(i, unit, cfg, spec, work) for i, unit in enumerate(units)]
    reports = dict(in_workers(chat_unit, tasks, workers, f"chat data ({workers} workers)"))
    sampling = Counter()
    for name, src in cfg["sources"].items():
        if src == "embedded:tasks":
            reports[len(reports)] = task_unit(len(reports), name, cfg, enc, work, sampling)
    reports = [reports[i] for i in range(len(reports))]
    merged = {"skipped": Counter(), "notes": Counter(), "replaced_bytes": Counter(), "empty_files": []}
    for r in reports:
        for key in ("skipped", "notes", "replaced_bytes"):
            merged[key].update(r[key])
        merged["empty_files"] += r["empty_files"]
    for path, n in merged["replaced_bytes"].items():
        print(f"warning: {path}: {n} bytes that are not UTF-8 became U+FFFD", file=sys.stderr)
    for path in merged["empty_files"]:
        print(f"warning: {path}: no records", file=sys.stderr)
    sizes = Counter()
    for r in reports:
        sizes[r["source"]] += r["train"]
    epochs = mix_plan(sizes, cfg["mix_weights"], cfg["mix_temperature"], sum(sizes.values()))
    counts = {split: concatenate(reports, split, epochs if split == "train" else None, cfg, work, tmp_dir)
              for split in ("train", "val")}
    for split, c in counts.items():
        if not c["examples" if cfg["kind"] == "sft" else "pairs"]:
            raise DataError(f"no {split} examples (val_fraction={cfg['val_fraction']})"
                            + (f"; files without records: {', '.join(merged['empty_files'][:5])}"
                               if merged["empty_files"] else ""))
    shutil.rmtree(work)
    if "ranks" in spec:  # a trained BPE travels as a file beside meta.json, as for pretraining data
        save_bpe(spec, os.path.join(tmp_dir, "tokenizer.bpe"))
        spec = {"kind": "bpe", "path": "tokenizer.bpe"}
    notes = merged["notes"]
    meta = {"kind": cfg["kind"], "vocab_size": enc.n_vocab, "tokenizer": spec,
            "special_tokens": {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)},
            **{f"{split}_{k}": v for split, c in counts.items() for k, v in c.items()},
            "mix": {s: {"examples": sizes[s], "epochs": round(e, 4)} for s, e in epochs.items()},
            "skipped": dict(merged["skipped"]), "too_long": {"policy": cfg["too_long"], "truncated": notes["truncated"],
                                                            "dropped": notes["dropped"]},
            "low_margin": notes["low_margin"], "replaced_bytes": dict(merged["replaced_bytes"]),
            "empty_files": merged["empty_files"], **({"sampling": dict(sampling)} if sampling else {}),
            "config": cfg}
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return (", ".join(f"{s} {c}" for s, c in counts.items()) + (f"; sampling {dict(sampling)}" if sampling else "")
            + (f"; skipped {dict(merged['skipped'])}" if merged["skipped"] else "")
            + "".join(f"; {k} {notes[k]}" for k in ("truncated", "dropped", "low_margin") if notes[k]))


def chat_unit(task):
    """Worker: read, check and render one unit's records, each to val by a seeded hash of its source, file
    name and position; write them (write_unit). Returns the unit's report."""
    index, unit, cfg, spec, work = task
    enc = load_tokenizer(spec)
    stats, notes, skipped = {"replaced_bytes": Counter(), "empty_files": []}, Counter(), Counter()
    render = render_sft if cfg["kind"] == "sft" else render_pair
    examples = rendered(unit_records(unit, stats, cfg["kind"]), lambda rec: render(enc, rec, cfg, notes), cfg, skipped)
    source = unit["source"]

    def split_of(loc):  # the position within its file, not the folder it was read from
        key = hashlib.blake2b(f"{source}:{os.path.basename(loc)}".encode(), digest_size=8).digest()
        key = np.frombuffer(key, dtype=np.uint64)
        return "val" if hashed_fraction(key, cfg["seed"])[0] < cfg["val_fraction"] else "train", key[0]
    counts = write_unit(os.path.join(work, f"chat-{index:05d}"), ((*split_of(loc), ex) for loc, ex in examples),
                        cfg["kind"])
    return index, {"source": source, **counts, "skipped": dict(skipped), "notes": dict(notes),
                   "replaced_bytes": dict(stats["replaced_bytes"]), "empty_files": stats["empty_files"]}


def task_unit(index, source, cfg, enc, work, sampling):
    """embedded:tasks: the tasks' examples (sft) or on-policy pairs sampled from from_ckpt (dpo), from the
    tasks' own train and held-out val items, written as one more unit."""
    import tasks
    n = cfg["task_examples"] if cfg["kind"] == "sft" else cfg["pair_prompts"]
    notes, skipped, items = Counter(), Counter(), []
    model = load_policy(cfg["from_ckpt"]) if cfg["kind"] == "dpo" else None
    for split, count in (("train", n), ("val", max(1, n // 10))):
        if cfg["kind"] == "sft":
            records = [(f"tasks:{split}:{i}", ex["messages"]) for i, ex in enumerate(
                tasks.make_examples(count, split, cfg["seed"], cfg["tasks"] or tuple(tasks.TASKS)))]
        else:
            records = on_policy_pairs(cfg, model, enc, split, count, sampling)
        render = render_sft if cfg["kind"] == "sft" else render_pair
        items += [(split, zlib.crc32(loc.encode()), ex) for loc, ex in
                  rendered(records, lambda rec: render(enc, rec, cfg, notes), cfg, skipped)]
    counts = write_unit(os.path.join(work, f"chat-{index:05d}"), items, cfg["kind"])
    return {"source": source, **counts, "skipped": dict(skipped), "notes": dict(notes), "replaced_bytes": {},
            "empty_files": []}


def write_unit(name, items, kind):
    """Rendered examples (split, key, example) into name.{split}.bin (uint16 tokens), .mask.bin (uint8,
    sft), .lens (int64: an example's length; a pair's prompt, chosen and rejected lengths) and .keys
    (uint64, for the mix's seeded subsampling). Returns the number of train and val examples."""
    files = {s: {"bin": open(f"{name}.{s}.bin", "wb")} for s in ("train", "val")}
    if kind == "sft":
        for s in files:
            files[s]["mask"] = open(f"{name}.{s}.mask.bin", "wb")
    lens, keys = {"train": [], "val": []}, {"train": [], "val": []}
    for split, key, example in items:
        if kind == "sft":
            ids, mask = example
            np.array(mask, dtype=np.uint8).tofile(files[split]["mask"])
            lens[split].append(len(ids))
        else:
            ids = [t for part in example for t in part]
            lens[split].append([len(part) for part in example])
        np.array(ids, dtype=np.uint16).tofile(files[split]["bin"])
        keys[split].append(int(key))
    for s in ("train", "val"):
        for f in files[s].values():
            f.close()
        np.array(lens[s], dtype=np.int64).tofile(f"{name}.{s}.lens")
        np.array(keys[s], dtype=np.uint64).tofile(f"{name}.{s}.keys")
    return {s: len(lens[s]) for s in ("train", "val")}


def concatenate(reports, split, epochs, cfg, work, tmp_dir):
    """The split's files from every unit's, in unit order; with epochs (train), each example written
    floor(e) times and once more if its seeded hash falls below e - floor(e), e its source's epochs."""
    sft = cfg["kind"] == "sft"
    lens_all, n_tokens, n_assistant = [], 0, 0
    out = open(os.path.join(tmp_dir, f"{split}.bin"), "wb")
    out_mask = open(os.path.join(tmp_dir, f"{split}.mask.bin"), "wb") if sft else None
    for u, r in enumerate(reports):
        name = os.path.join(work, f"chat-{u:05d}.{split}")
        if not r[split]:
            continue
        lens = np.fromfile(f"{name}.lens", dtype=np.int64).reshape(r[split], -1)
        starts = np.concatenate([[0], np.cumsum(lens.sum(1))])
        repeats = np.ones(len(lens), dtype=np.int64)
        if epochs is not None:
            keys = np.fromfile(f"{name}.keys", dtype=np.uint64)
            repeats = mix_repeats(np.full(len(lens), epochs.get(r["source"], 0.0)), hashed_fraction(keys, cfg["seed"] + 1))
        tokens = np.fromfile(f"{name}.bin", dtype=np.uint16)
        mask = np.fromfile(f"{name}.mask.bin", dtype=np.uint8) if sft else None
        for i in np.flatnonzero(repeats):
            for _ in range(repeats[i]):
                tokens[starts[i]:starts[i + 1]].tofile(out)
                if sft:
                    mask[starts[i]:starts[i + 1]].tofile(out_mask)
                    n_assistant += int(mask[starts[i]:starts[i + 1]].sum())
                lens_all.append(lens[i])
                n_tokens += int(starts[i + 1] - starts[i])
    out.close()
    if sft:
        out_mask.close()
    offsets = np.concatenate([[0], np.cumsum(np.array(lens_all, dtype=np.int64).reshape(-1))]).astype(np.int64)
    if sft:
        offsets.tofile(os.path.join(tmp_dir, f"{split}.idx"))
        return {"examples": len(lens_all), "tokens": n_tokens, "assistant_tokens": n_assistant}
    np.column_stack([offsets[:-1:3], offsets[1::3], offsets[2::3], offsets[3::3]]).astype(np.int64).tofile(
        os.path.join(tmp_dir, f"{split}.idx"))  # a pair's prompt, chosen, rejected starts and its end
    return {"pairs": len(lens_all), "tokens": n_tokens}


# ----------------------------------------------------------------------------- on-policy pairs, the tokenizer, converting


def on_policy_pairs(cfg, model, enc, split, n, stats):
    """Preference pairs on the tasks' prompts, judged by each task's checker: the model's greedy answer
    first, then samples_per_prompt sampled ones; the first correct answer is chosen and the first
    incorrect one rejected. So a wrong greedy answer, the one greedy evaluation scores, is always the
    rejected reply. A prompt the model always gets right gives no pair; one it never gets right gives
    the reference answer as chosen, or no pair with reference_chosen=False (then both replies of every
    pair are the model's own)."""
    import tasks
    import torch
    from engine import chat_replies
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
                except PARSE_ERRORS as e:
                    sys.exit(f"{loc}: {e}")
                out.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    except DataError as e:
        os.remove(tmp)
        sys.exit(str(e))
    except BaseException as e:  # a failed conversion leaves no partial file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            sys.exit(f"convert_out '{cfg['convert_out']}': {e.strerror}")
        raise
    os.replace(tmp, cfg["convert_out"])
    print(f"wrote {cfg['convert_out']}")

"""
Batch sources: what train.py reads of a prepared dataset (prepare.py's output, or any files in its
format), one class per kind of data, each checking its files before a step is taken.

  PretrainBatches    random windows of a flat uint16 token stream (train.bin, val.bin)
  SFTBatches         whole chat examples packed into rows, the loss only on the assistant's tokens
  PreferenceBatches  pairs of a prompt with a chosen and a rejected reply
  RewardBatches      the same pairs, whole, for a reward model
  TaskPrompts        prompts of the verifiable tasks (tasks.py) with their answers, for RL

Every problem with the files raises DatasetError naming the file; train.py reports it and stops.
"""
import json
import os
import random
import sys

import numpy as np
import torch

import tasks
from engine import completion_rows, whole_rows
from model import doc_ids_from_eot
from tokenizer import load_tokenizer, render_chat


class DatasetError(Exception):
    """A dataset train.py cannot use, named by its file."""


class Batches:
    """What train() asks of a mode's data, and nothing else:
      meta                        the dataset's meta.json
      get(split, n, generator)    a batch dict of n rows of 'train' or 'val', drawn by generator
                                  (evaluation passes a fresh seeded one, so every eval sees the same rows)
      next_train(n, sampler)      the training stream's next n rows; by default get('train') with the
                                  run's shared sampler, whose state the checkpoint saves
      count(batch)                how many loss terms the batch holds: a step's summed loss is divided by
                                  the total over all its micro-batches and ranks; by default the targets
      state(), load_state(s)      the stream's position beyond the sampler, saved in the checkpoint"""
    kind = None

    def next_train(self, n, sampler):
        return self.get("train", n, sampler)

    @staticmethod
    def count(batch):
        return (batch["targets"] != -100).sum()

    def state(self):
        return {}

    def load_state(self, state):
        pass


class PretrainBatches(Batches):
    """Random windows of block_size+1 tokens from data_dir/{train,val}.bin (flat uint16 streams)."""
    kind = "pretrain"

    def __init__(self, data_dir, cfg, scanned_files):
        self.meta = read_meta(data_dir, self.kind)
        self.block_size = cfg["block_size"]
        self.paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "val")}
        for split, path in self.paths.items():
            check_count(self.meta, f"{split}_tokens", len(open_tokens(path, self.block_size + 1)), data_dir)
        check_ids(data_dir, self.meta, scanned_files)
        self.eot = self.meta.get("special_tokens", {}).get("<|endoftext|>")
        if cfg["doc_mask"] and self.eot is None:
            raise DatasetError(f"doc_mask=True needs '<|endoftext|>' in special_tokens of {data_dir}/meta.json")
        self.doc_mask = cfg["doc_mask"]

    def get(self, split, n, generator):
        # a fresh memmap per batch, as nanoGPT does: the pages a long run touches in a multi-GB file would
        # otherwise stay mapped and count in the process's memory (bench/memmap_rss.py measures it)
        data = np.memmap(self.paths[split], dtype=np.uint16, mode="r")
        starts = torch.randint(len(data) - self.block_size, (n,), generator=generator).tolist()
        w = torch.from_numpy(np.stack([data[s:s + self.block_size + 1] for s in starts]).astype(np.int64))
        batch = {"idx": w[:, :-1], "targets": w[:, 1:]}
        if self.doc_mask:
            batch["doc_ids"] = doc_ids_from_eot(batch["idx"], self.eot)
        return batch


class SFTBatches(Batches):
    """Chat examples (data_dir/{split}.bin, .mask.bin, .idx) packed whole into rows of block_size.
    Each example predicts only its own next tokens, only where the mask is 1 (the assistant's), and
    attends only within itself (doc_ids). The training stream walks a seeded permutation per epoch, so
    every example is seen once per epoch; the cursor is part of the checkpoint. Evaluation draws
    examples with its own generator. Padding: <|pad|> tokens with no target."""
    kind = "sft"

    def __init__(self, data_dir, cfg, scanned_files):
        self.meta = read_meta(data_dir, self.kind)
        self.block_size, self.seed = cfg["block_size"], cfg["seed"]
        self.pad = special_token(self.meta, "<|pad|>", data_dir)
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(data_dir, split)
            tokens = open_tokens(f"{path}.bin", 2)
            mask = open_tokens(f"{path}.mask.bin", len(tokens), np.uint8, "flags")
            if len(mask) != len(tokens):
                raise DatasetError(f"'{path}.mask.bin' holds {len(mask)} flags for the {len(tokens)} tokens "
                                   f"of '{path}.bin'")
            offsets = np.array(open_tokens(f"{path}.idx", 2, np.int64, "offsets"))
            check_offsets(f"{path}.idx", offsets, len(tokens))
            check_count(self.meta, f"{split}_examples", len(offsets) - 1, data_dir)
            check_count(self.meta, f"{split}_tokens", len(tokens), data_dir)
            longest = int(np.diff(offsets).max()) - 1
            if longest > self.block_size:
                raise DatasetError(f"'{data_dir}/{split}' has an example of {longest} positions: raise "
                                   f"block_size to it")
            self.splits[split] = (tokens, mask, offsets)
        check_ids(data_dir, self.meta, scanned_files)
        self.epoch, self.pos, self.order = 0, 0, self._order(0)
        self.replay, self.replay_fraction = None, cfg["replay"]
        if self.replay_fraction > 0:
            self.replay = PretrainBatches(os.path.join(cfg["data_root"], cfg["replay_dataset"]), cfg, scanned_files)
            if self.replay.meta["vocab_size"] > self.meta["vocab_size"]:
                raise DatasetError(f"replay_dataset '{cfg['replay_dataset']}' has vocab_size "
                                   f"{self.replay.meta['vocab_size']}, more than the {self.meta['vocab_size']} "
                                   f"of '{data_dir}': not the same tokenizer")

    def _order(self, epoch):
        n = len(self.splits["train"][2]) - 1
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state):
        self.epoch, self.pos, self.order = state["epoch"], state["pos"], self._order(state["epoch"])

    def _advance(self):
        self.pos += 1
        if self.pos == len(self.order):
            self.epoch, self.pos, self.order = self.epoch + 1, 0, self._order(self.epoch + 1)

    def next_train(self, n, sampler):
        """The training stream: the next rows of the epoch's order; with replay, round(n * replay) of the
        n rows (at least one row stays SFT's) are instead random pretraining windows, every token a
        target, drawn by the shared sampler: the mixture that keeps SFT from erasing the language model."""
        k = min(round(n * self.replay_fraction), n - 1) if self.replay else 0
        batch = self._rows("train", n - k, None)
        if k:
            windows = self.replay.get("train", k, sampler)
            windows.setdefault("doc_ids", torch.zeros_like(windows["idx"]))  # one document per window
            batch = {key: torch.cat((batch[key], windows[key])) for key in batch}
        return batch

    def get(self, split, n, generator):
        """n rows of one example each, drawn by the given generator (evaluation; the stream is untouched)."""
        return self._rows(split, n, generator)

    def _rows(self, split, n, generator):
        tokens, mask, offsets = self.splits[split]
        T = self.block_size
        idx = torch.full((n, T), self.pad, dtype=torch.long)
        targets = torch.full((n, T), -100, dtype=torch.long)
        doc_ids = torch.full((n, T), -1, dtype=torch.long)
        for row in range(n):
            used, doc = 0, 0
            while True:
                if generator is None:
                    j = self.order[self.pos]
                else:
                    j = int(torch.randint(len(offsets) - 1, (1,), generator=generator))
                a, b = offsets[j], offsets[j + 1]
                L = b - a - 1  # positions: each token but the last predicts the next
                if doc > 0 and used + L > T:
                    break  # does not fit: it opens the next row
                if generator is None:
                    self._advance()
                t = torch.from_numpy(tokens[a:b].astype(np.int64))
                m = torch.from_numpy(mask[a + 1:b].astype(bool))
                idx[row, used:used + L] = t[:-1]
                targets[row, used:used + L] = torch.where(m, t[1:], -100)
                doc_ids[row, used:used + L] = doc
                used, doc = used + L, doc + 1
                if generator is not None:
                    break  # eval rows hold one example: the same batches whatever the packing
        return {"idx": idx, "targets": targets, "doc_ids": doc_ids}


class PreferenceBatches(Batches):
    """Preference pairs (data_dir/{split}.bin, and .idx: int64 rows of prompt, chosen, rejected, end
    offsets). A batch of n pairs is 2n rows, the n chosen sequences then the n rejected ones, each the
    prompt followed by its completion, padded to the longest; only completion tokens are targets."""
    kind = "dpo"
    shift = 1  # a row is its sequence but the last token (the inputs of next-token targets)

    def __init__(self, data_dir, cfg, scanned_files):
        self.meta = read_meta(data_dir, self.kind)
        self.pad = special_token(self.meta, "<|pad|>", data_dir)
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(data_dir, split)
            tokens = open_tokens(f"{path}.bin", 3)
            spans = np.array(open_tokens(f"{path}.idx", 4, np.int64, "offsets"))
            if len(spans) % 4:
                raise DatasetError(f"'{path}.idx' holds {len(spans)} offsets, not rows of 4 (prompt, chosen, "
                                   f"rejected, end)")
            check_offsets(f"{path}.idx", spans, len(tokens))  # the rows tile the file in order
            spans = spans.reshape(-1, 4)
            if (spans[1:, 0] != spans[:-1, 3]).any() or (np.diff(spans, axis=1) == 0).any():
                raise DatasetError(f"'{path}.idx': each pair's rows must follow the last and hold a prompt "
                                   f"and two replies")
            check_count(self.meta, f"{split}_pairs", len(spans), data_dir)
            check_count(self.meta, f"{split}_tokens", len(tokens), data_dir)
            p, c, r, e = spans.T
            longest = int(np.maximum(r - p, (c - p) + (e - r)).max())  # prompt + the longer completion
            if longest - self.shift > cfg["block_size"]:
                raise DatasetError(f"'{data_dir}/{split}' has a pair of {longest} tokens: raise block_size "
                                   f"to {longest - self.shift}")
            self.splits[split] = (tokens, spans)
        check_ids(data_dir, self.meta, scanned_files)

    @staticmethod
    def count(batch):
        return batch["n_pairs"]

    def get(self, split, n, generator):
        return self.batch(split, torch.randint(len(self.splits[split][1]), (n,), generator=generator).tolist())

    def pairs(self, split, ids):
        """The pairs ids of a split as (prompt, completion) arrays: the chosen ones, then the rejected ones."""
        tokens, spans = self.splits[split]
        chosen, rejected = [], []
        for j in ids:
            p, c, r, e = spans[j]
            prompt = tokens[p:c].astype(np.int64)
            chosen.append((prompt, tokens[c:r].astype(np.int64)))
            rejected.append((prompt, tokens[r:e].astype(np.int64)))
        return chosen + rejected

    def batch(self, split, ids):
        return {**completion_rows(self.pairs(split, ids), self.pad), "n_pairs": torch.tensor(len(ids))}


class RewardBatches(PreferenceBatches):
    """The preference pairs for a reward model: each row a whole sequence (prompt and reply), padded,
    and 'last', the position of its reply's last token, where the reward is read."""
    shift = 0

    def batch(self, split, ids):
        return {**whole_rows(self.pairs(split, ids), self.pad), "n_pairs": torch.tensor(len(ids))}


class TaskPrompts(Batches):
    """Prompts of the verifiable tasks (tasks.py) with their answers, for RL: 'train' prompts from the
    tasks' train split, 'val' from their held-out val split, in the chat template of the policy's own
    tokenizer (the checkpoint's: RL reads no dataset). Each prompt comes from a seed drawn by the run's
    sampler (or the evaluation's generator); the seed also draws the prompt's sampled replies, so a
    prompt and its replies are the same whichever process takes them. A batch of n prompts counts
    n * samples loss terms: one per reply; train.py's RLLoss samples and scores the replies."""
    kind = "rl"

    def __init__(self, cfg, ckpt):
        if ckpt is None:
            raise DatasetError("mode='rl' starts from a chat (SFT) checkpoint: set init_from")
        self.meta = {"kind": self.kind, "vocab_size": ckpt["model_config"]["vocab_size"], "tokenizer": ckpt["tokenizer"]}
        self.enc = load_tokenizer(ckpt["tokenizer"])
        for name in ("<|im_start|>", "<|im_end|>", "<|pad|>"):
            if name not in self.enc.special_tokens_set:
                raise DatasetError(f"the checkpoint's tokenizer has no '{name}': mode='rl' starts from a chat "
                                   f"(SFT) checkpoint")
        self.end, self.pad = self.enc.encode_single_token("<|im_end|>"), self.enc.encode_single_token("<|pad|>")
        self.tasks, self.samples = tuple(cfg["rl_tasks"] or tasks.TASKS), cfg["rl_samples"]

    def count(self, batch):
        return torch.tensor(len(batch["prompts"]) * self.samples)

    def get(self, split, n, generator):
        seeds = torch.randint(2**62, (n,), generator=generator)
        prompts, answers = [], []
        for seed in seeds.tolist():
            rng = random.Random(seed)
            prompt, answer = tasks.TASKS[self.tasks[rng.randrange(len(self.tasks))]](rng, split)
            prompts.append(render_chat(self.enc, [{"role": "user", "content": prompt}], generation_prompt=True)[0])
            answers.append(answer)
        return {"prompts": prompts, "answers": answers, "seeds": seeds}


def to_device(batch, device):
    """The batch's tensors on the device (lists, as RL's prompts, stay as they are)."""
    pin = device.startswith("cuda")
    return {k: v if not torch.is_tensor(v) else v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)
            for k, v in batch.items()}

# ----------------------------------------------------------------------------- checking a dataset's files


def read_meta(data_dir, kind):
    """meta.json of a dataset, its types checked: kind, a positive int vocab_size within uint16 token
    files, optional special_tokens {name: id}, optional tokenizer (a kind name or a spec)."""
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data directory '{data_dir}' not found (build it with prepare.py)")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DatasetError(f"'{path}' not found: '{data_dir}' is not a prepared dataset")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:
        raise DatasetError(f"'{path}' is not valid JSON ({e}): rebuild it with prepare.py") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"'{path}' must hold a JSON object")
    for key in ("kind", "vocab_size"):
        if key not in meta:
            raise DatasetError(f"'{path}' has no '{key}'")
    if meta["kind"] != kind:
        raise DatasetError(f"'{path}' holds kind '{meta['kind']}' data, but mode '{kind}' needs kind '{kind}'")
    v = meta["vocab_size"]
    if type(v) is not int or not 1 <= v <= 65536:
        raise DatasetError(f"'{path}': vocab_size must be an integer from 1 to 65536 (uint16 tokens), not {v!r}")
    specials = meta.get("special_tokens", {})
    if not isinstance(specials, dict) or any(type(i) is not int or not 0 <= i < v for i in specials.values()):
        raise DatasetError(f"'{path}': special_tokens must map names to ids below vocab_size {v}")
    if not isinstance(meta.get("tokenizer", "bytes"), (str, dict)):
        raise DatasetError(f"'{path}': tokenizer must be a kind name or a spec object")
    return meta


def open_tokens(path, min_len, dtype=np.uint16, what="tokens"):
    """Memmap of a token file, after checks of its size: whole items, at least min_len of them."""
    if not os.path.isfile(path):
        raise DatasetError(f"'{path}' not found")
    size, item = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % item:
        raise DatasetError(f"'{path}' is {size} bytes, not a whole number of {dtype.__name__} items: it is "
                           f"truncated or not a token file")
    n = size // item
    if n < min_len:
        raise DatasetError(f"'{path}' holds {n} {what}, fewer than the {min_len} it needs")
    return np.memmap(path, dtype=dtype, mode="r")


def scan_max(path):
    """The largest id in a uint16 token file, read in chunks of 16M tokens (about a second per GB)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    return max((int(data[i:i + (1 << 24)].max()) for i in range(0, len(data), 1 << 24)), default=0)


def max_token_id(path, scanned_files):
    """scan_max, remembered in scanned_files by (path, size, mtime): the checkpoint carries that record,
    so a resumed run does not read its data again."""
    st = os.stat(path)
    key = os.path.abspath(path)
    if scanned_files.get(key, {}).get("stamp") != [st.st_size, st.st_mtime_ns]:
        scanned_files[key] = {"stamp": [st.st_size, st.st_mtime_ns], "max_id": scan_max(path)}
    return scanned_files[key]["max_id"]


def check_ids(data_dir, meta, scanned_files):
    """Every id in train.bin and val.bin must be below meta.json's vocab_size (a larger one would crash,
    or train an embedding row no tokenizer can produce); a vocab_size far above the ids is worth a word."""
    paths = (os.path.join(data_dir, f"{s}.bin") for s in ("train", "val"))
    top, path = max((max_token_id(p, scanned_files), p) for p in paths)
    v = meta["vocab_size"]
    if top >= v:
        raise DatasetError(f"'{path}' holds token id {top}, but '{data_dir}/meta.json' says vocab_size {v}")
    if v > 2 * (top + 1) and v > top + 1 + 256:
        print(f"warning: '{data_dir}/meta.json' says vocab_size {v}, but no token id exceeds {top}: the "
              f"loss starts at ln({v}); check that the data and meta.json belong together", file=sys.stderr)


def check_offsets(path, offsets, n_tokens):
    """int64 offsets into a token file: from 0, never decreasing, ending at the file's length."""
    if offsets[0] != 0 or offsets[-1] != n_tokens or (np.diff(offsets) < 0).any():
        raise DatasetError(f"'{path}' does not index its token file: its offsets must start at 0, never "
                           f"decrease and end at the token count {n_tokens}")


def check_count(meta, key, n, data_dir):
    if key in meta and meta[key] != n:
        raise DatasetError(f"'{data_dir}/meta.json' says {key}={meta[key]!r}, but the files hold {n}")


def special_token(meta, name, data_dir):
    if name not in meta.get("special_tokens", {}):
        raise DatasetError(f"'{data_dir}/meta.json' has no special token '{name}' in special_tokens")
    return meta["special_tokens"][name]

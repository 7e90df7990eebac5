"""
One training loop for every stage: mode='pretrain' (next-token prediction on token memmaps); the SFT and
DPO modes plug into the same loop as a batch source and a loss.

    python train.py config/pretrain_tiny.py                        # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train.py config/pretrain.py        # DDP on one node
    torchrun --nproc_per_node=8 train.py config/pretrain_1b.py     # FSDP: weights and state sharded
    python train.py config/pretrain_tiny.py --init_from=resume     # continue exactly where it stopped
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import parallel
from configurator import AT_LEAST_1, NON_NEGATIVE, NOT_EMPTY, POSITIVE, configure, one_of, require
from model import DTYPES, GPT, GPTConfig, autocast_context, config_from_checkpoint, doc_ids_from_eot
from tokenizer import inline_spec

defaults = dict(
    # I/O
    out_dir="out",
    init_from="scratch",        # 'scratch' | 'resume' (out_dir/ckpt.pt) | path of a checkpoint to start from
    overwrite=False,            # True: a new run may replace the checkpoint already in out_dir
    eval_interval=250,
    eval_iters=20,
    log_interval=10,
    always_save_checkpoint=True,  # False: save only when val loss improves
    stop_at_iter=-1,            # stop (and save) here without changing the schedule; -1 = run to max_iters
    wandb_log=False,
    wandb_project="llm",
    wandb_run_name="run",
    # data
    mode="pretrain",
    dataset="demo",             # reads data_root/<dataset>/
    data_root="data",
    batch_size=16,              # micro-batch per process
    block_size=256,
    gradient_accumulation_steps=1,  # summed over all processes: divided by the number of ranks
    doc_mask=False,             # attend only within each document of a packed window
    replay=0.0,                 # mode='sft': this fraction of each batch's rows are pretraining windows
    replay_dataset="",          # ... from this pretraining dataset under data_root (keeps the language model)
    # model: every field of model.GPTConfig is a key (rope_theta, norm_eps, tie_embeddings, ... at
    # GPTConfig's defaults, added below); these differ from its defaults. From the checkpoint instead when
    # init_from is a path.
    n_layer=4,
    n_head=4,
    n_kv_head=4,
    n_embd=256,
    hidden_dim=0,               # 0 = about 8/3 * n_embd
    dropout=0.0,
    # AdamW (or Muon for the matrices inside the blocks) with linear warmup, then cosine decay to min_lr
    optimizer="adamw",          # 'adamw' | 'muon': Muon for the blocks' matrices, AdamW for the rest
    muon_lr=0.02,               # optimizer='muon': its peak learning rate (the schedule scales it too)
    muon_momentum=0.95,
    learning_rate=1e-3,
    max_iters=600,
    warmup_iters=-1,            # -1 = 1% of max_iters
    min_lr=-1.0,                # -1 = 10% of learning_rate
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,              # 0 = off
    # stability: skip the update of a step whose loss is NaN/inf or spikes over the running mean
    spike_factor=4.0,           # a spike is loss > spike_factor * running mean; 0 = off
    max_bad_steps=5,            # this many skipped steps in a row stop the run
    # mode='dpo': preference optimization against a frozen reference (the init_from checkpoint)
    loss_type="sigmoid",        # 'sigmoid' (DPO) | 'ipo' | 'hinge' | 'robust' | 'simpo' | 'orpo'
    beta=0.1,                   # strength of the implicit KL constraint (simpo/orpo: reward scale)
    label_smoothing=0.0,        # robust: assumed fraction of flipped labels, in [0, 0.5)
    simpo_gamma=0.5,            # simpo: target reward margin
    orpo_lambda=0.1,            # orpo: weight of the odds-ratio term
    ref_from="",                # reference checkpoint; '' = the run's first init_from
    rpo_alpha=0.0,              # adds rpo_alpha * the chosen reply's NLL per token (RPO; TRL's rpo_alpha)
    # system
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="auto",               # 'bfloat16' autocast, 'float32', or 'auto': bfloat16 where the hardware has it
    compile=False,
    seed=1337,
    parallel="ddp",             # under torchrun: 'ddp' (whole model per process) | 'fsdp' (sharded: parallel.py)
    dist_timeout=600.0,         # seconds a process waits for the others (torchrun) before it fails
    peak_flops=0.0,             # device peak FLOP/s for MFU; 0 = known GPUs' bf16 dense peak, else no MFU
)

MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")  # the vocabulary is the data's
defaults = {**{f.name: f.default for f in fields(GPTConfig) if f.name in MODEL_KEYS}, **defaults}
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")  # mode='dpo': see preference_loss
REFERENCE_FREE = ("simpo", "orpo")

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():
        # under torchrun, leave at once: tearing down the process group and DDP's reducer while
        # Python shuts down can abort in gloo's threads ("terminate called without an active
        # exception", 1 in 10 runs). Everything this script writes is flushed or atomic already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(1)


def get_lr(it, lr, min_lr, warmup_iters, max_iters):
    """Linear warmup from lr/warmup_iters to lr, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def read_meta(data_dir, kind):
    """meta.json of a dataset, its types checked: kind, a positive int vocab_size within uint16 token
    files, optional special_tokens {name: id}, optional tokenizer (a kind name or a spec)."""
    if not os.path.isdir(data_dir):
        fail(f"data directory '{data_dir}' not found (build it with prepare.py)")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        fail(f"'{path}' not found: '{data_dir}' is not a prepared dataset")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:
        fail(f"'{path}' is not valid JSON ({e}): rebuild it with prepare.py")
    if not isinstance(meta, dict):
        fail(f"'{path}' must hold a JSON object")
    for key in ("kind", "vocab_size"):
        if key not in meta:
            fail(f"'{path}' has no '{key}'")
    if meta["kind"] != kind:
        fail(f"'{path}' holds kind '{meta['kind']}' data, but mode '{kind}' needs kind '{kind}'")
    v = meta["vocab_size"]
    if type(v) is not int or not 1 <= v <= 65536:
        fail(f"'{path}': vocab_size must be an integer from 1 to 65536 (uint16 tokens), not {v!r}")
    specials = meta.get("special_tokens", {})
    if not isinstance(specials, dict) or any(type(i) is not int or not 0 <= i < v for i in specials.values()):
        fail(f"'{path}': special_tokens must map names to ids below vocab_size {v}")
    if not isinstance(meta.get("tokenizer", "bytes"), (str, dict)):
        fail(f"'{path}': tokenizer must be a kind name or a spec object")
    return meta


def open_tokens(path, min_len, dtype=np.uint16, what="tokens"):
    """Memmap of a token file, after checks of its size: whole items, at least min_len of them."""
    if not os.path.isfile(path):
        fail(f"'{path}' not found")
    size, item = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % item:
        fail(f"'{path}' is {size} bytes, not a whole number of {dtype.__name__} items: it is truncated or "
             f"not a token file")
    n = size // item
    if n < min_len:
        fail(f"'{path}' holds {n} {what}, fewer than the {min_len} it needs")
    return np.memmap(path, dtype=dtype, mode="r")


def scan_max(path):
    """The largest id in a uint16 token file, read in chunks of 16M tokens (seconds for GBs)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    return max((int(data[i:i + (1 << 24)].max()) for i in range(0, len(data), 1 << 24)), default=0)


def largest_id(path, checked):
    """scan_max, cached in checked by (path, size, mtime): the checkpoint carries that cache, so a
    resumed run does not read its data again."""
    st = os.stat(path)
    key = os.path.abspath(path)
    if checked.get(key, {}).get("stamp") != [st.st_size, st.st_mtime_ns]:
        checked[key] = {"stamp": [st.st_size, st.st_mtime_ns], "max_id": scan_max(path)}
    return checked[key]["max_id"]


def check_ids(data_dir, meta, checked):
    """Every id in train.bin and val.bin must be below meta.json's vocab_size (a larger one would crash,
    or train an embedding row no tokenizer can produce); a vocab_size far above the ids is worth a word."""
    top, path = max((largest_id(p, checked), p) for p in (os.path.join(data_dir, f"{s}.bin") for s in ("train", "val")))
    v = meta["vocab_size"]
    if top >= v:
        fail(f"'{path}' holds token id {top}, but '{data_dir}/meta.json' says vocab_size {v}")
    if v > 2 * (top + 1) and v > top + 1 + 256:
        print(f"warning: '{data_dir}/meta.json' says vocab_size {v}, but no token id exceeds {top}: the "
              f"loss starts at ln({v}); check that the data and meta.json belong together", file=sys.stderr)


def check_index(path, offsets, n_tokens):
    """int64 offsets into a token file: from 0, never decreasing, ending at the file's length."""
    if offsets[0] != 0 or offsets[-1] != n_tokens or (np.diff(offsets) < 0).any():
        fail(f"'{path}' does not index its token file: its offsets must start at 0, never decrease and end "
             f"at the token count {n_tokens}")


def check_count(meta, key, n, data_dir):
    if key in meta and meta[key] != n:
        fail(f"'{data_dir}/meta.json' says {key}={meta[key]!r}, but the files hold {n}")


def special_token(meta, name, data_dir):
    if name not in meta.get("special_tokens", {}):
        fail(f"'{data_dir}/meta.json' has no special token '{name}' in special_tokens")
    return meta["special_tokens"][name]


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

    def __init__(self, data_dir, cfg, checked):
        self.meta = read_meta(data_dir, self.kind)
        self.block_size = cfg["block_size"]
        self.paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "val")}
        for split, path in self.paths.items():
            check_count(self.meta, f"{split}_tokens", len(open_tokens(path, self.block_size + 1)), data_dir)
        check_ids(data_dir, self.meta, checked)
        self.eot = self.meta.get("special_tokens", {}).get("<|endoftext|>")
        if cfg["doc_mask"] and self.eot is None:
            fail(f"doc_mask=True needs '<|endoftext|>' in special_tokens of {data_dir}/meta.json")
        self.doc_mask = cfg["doc_mask"]

    def get(self, split, n, generator):
        # a fresh memmap per batch, as nanoGPT does: the pages a long run touches in a multi-GB file
        # would otherwise stay mapped and count in the process's RSS (bench/memmap_rss.py: +3.8 GB of
        # file-backed pages over 3,000 batches of a 4 GB file; 0.3 ms per batch to reopen)
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

    def __init__(self, data_dir, cfg, checked):
        self.meta = read_meta(data_dir, self.kind)
        self.block_size, self.seed = cfg["block_size"], cfg["seed"]
        self.pad = special_token(self.meta, "<|pad|>", data_dir)
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(data_dir, split)
            tokens = open_tokens(f"{path}.bin", 2)
            mask = open_tokens(f"{path}.mask.bin", len(tokens), np.uint8, "flags")
            if len(mask) != len(tokens):
                fail(f"'{path}.mask.bin' holds {len(mask)} flags for the {len(tokens)} tokens of '{path}.bin'")
            offsets = np.array(open_tokens(f"{path}.idx", 2, np.int64, "offsets"))
            check_index(f"{path}.idx", offsets, len(tokens))
            check_count(self.meta, f"{split}_examples", len(offsets) - 1, data_dir)
            check_count(self.meta, f"{split}_tokens", len(tokens), data_dir)
            longest = int(np.diff(offsets).max()) - 1
            if longest > self.block_size:
                fail(f"'{data_dir}/{split}' has an example of {longest} positions: raise block_size to it")
            self.splits[split] = (tokens, mask, offsets)
        check_ids(data_dir, self.meta, checked)
        self.epoch, self.pos, self.order = 0, 0, self._order(0)
        self.replay, self.replay_fraction = None, cfg["replay"]
        if self.replay_fraction > 0:
            self.replay = PretrainBatches(os.path.join(cfg["data_root"], cfg["replay_dataset"]), cfg, checked)
            if self.replay.meta["vocab_size"] > self.meta["vocab_size"]:
                fail(f"replay_dataset '{cfg['replay_dataset']}' has vocab_size {self.replay.meta['vocab_size']}, "
                     f"more than the {self.meta['vocab_size']} of '{data_dir}': not the same tokenizer")

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

    def __init__(self, data_dir, cfg, checked):
        self.meta = read_meta(data_dir, self.kind)
        self.pad = special_token(self.meta, "<|pad|>", data_dir)
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(data_dir, split)
            tokens = open_tokens(f"{path}.bin", 3)
            spans = np.array(open_tokens(f"{path}.idx", 4, np.int64, "offsets"))
            if len(spans) % 4:
                fail(f"'{path}.idx' holds {len(spans)} offsets, not rows of 4 (prompt, chosen, rejected, end)")
            check_index(f"{path}.idx", spans, len(tokens))  # the rows tile the file in order
            spans = spans.reshape(-1, 4)
            if (spans[1:, 0] != spans[:-1, 3]).any() or (np.diff(spans, axis=1) == 0).any():
                fail(f"'{path}.idx': each pair's rows must follow the last and hold a prompt and two replies")
            check_count(self.meta, f"{split}_pairs", len(spans), data_dir)
            check_count(self.meta, f"{split}_tokens", len(tokens), data_dir)
            p, c, r, e = spans.T
            longest = int(np.maximum(r - p, (c - p) + (e - r)).max())  # prompt + the longer completion
            if longest - 1 > cfg["block_size"]:
                fail(f"'{data_dir}/{split}' has a pair of {longest} tokens: raise block_size to {longest - 1}")
            self.splits[split] = (tokens, spans)
        check_ids(data_dir, self.meta, checked)

    @staticmethod
    def count(batch):
        return batch["n_pairs"]

    def get(self, split, n, generator):
        tokens, spans = self.splits[split]
        chosen, rejected = [], []
        for j in torch.randint(len(spans), (n,), generator=generator).tolist():
            p, c, r, e = spans[j]
            prompt = tokens[p:c].astype(np.int64)
            chosen.append((prompt, tokens[c:r].astype(np.int64)))
            rejected.append((prompt, tokens[r:e].astype(np.int64)))
        seqs = chosen + rejected
        T = max(len(a) + len(b) for a, b in seqs) - 1
        idx = torch.full((2 * n, T), self.pad, dtype=torch.long)
        targets = torch.full((2 * n, T), -100, dtype=torch.long)
        for i, (prompt, completion) in enumerate(seqs):
            t = torch.from_numpy(np.concatenate([prompt, completion]))
            idx[i, :len(t) - 1] = t[:-1]
            targets[i, len(prompt) - 1:len(t) - 1] = t[len(prompt):]  # the completion's tokens only
        return {"idx": idx, "targets": targets, "n_pairs": torch.tensor(n)}


# ----------------------------------------------------------------------------- the losses
# Each returns (loss summed over the batch's counted terms, {metric: summed value}).

def next_token_loss(model, batch):
    """Cross-entropy summed over the batch's targets (-100 = not a target); no extra metrics."""
    return model(batch["idx"], batch["targets"], doc_ids=batch.get("doc_ids"), reduction="sum")[1], {}


def sequence_logps(logits, targets):
    """Per row: the summed log-probability of its targets, and how many there are (-100 = none)."""
    mask = targets != -100
    logp = torch.gather(logits.float().log_softmax(-1), 2, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1), mask.sum(-1)


def preference_loss(cfg, pi_c, pi_r, len_c, len_r, ref_c=None, ref_r=None):
    """Per-pair losses and implicit rewards from summed completion log-probs (policy pi, reference ref).
    Delta = [pi(y_w) - ref(y_w)] - [pi(y_l) - ref(y_l)]; averaged forms divide each log-prob by its length.
      sigmoid (DPO, Rafailov et al. 2023):  -log sigma(beta * Delta)
      ipo     (Azar et al. 2023):           (Delta_avg - 1 / (2 beta))^2
      hinge   (SLiC):                       max(0, 1 - beta * Delta)
      robust  (label smoothing eps):        [-(1-eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1-2eps)
      simpo   (Meng et al. 2024, no ref):   -log sigma(beta * (avg pi(y_w) - avg pi(y_l)) - gamma)
      orpo    (Hong et al. 2024, no ref):   -avg pi(y_w) - lambda log sigma(log-odds(y_w) - log-odds(y_l)),
              log-odds(y) = a - log(1 - e^a) with a the averaged log-prob
    Rewards: beta * (pi - ref), or beta * avg pi without a reference."""
    beta, kind = cfg["beta"], cfg["loss_type"]
    avg_c, avg_r = pi_c / len_c, pi_r / len_r
    if kind in ("simpo", "orpo"):
        rewards = beta * avg_c, beta * avg_r
        if kind == "simpo":
            return -F.logsigmoid(beta * (avg_c - avg_r) - cfg["simpo_gamma"]), rewards
        log_odds = (avg_c - torch.log1p(-torch.exp(avg_c))) - (avg_r - torch.log1p(-torch.exp(avg_r)))
        return -avg_c - cfg["orpo_lambda"] * F.logsigmoid(log_odds), rewards
    delta = (pi_c - ref_c) - (pi_r - ref_r)
    rewards = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * delta), rewards
    if kind == "ipo":
        delta_avg = (avg_c - ref_c / len_c) - (avg_r - ref_r / len_r)
        return (delta_avg - 1 / (2 * beta)) ** 2, rewards
    if kind == "hinge":
        return torch.relu(1 - beta * delta), rewards
    if kind == "robust":
        eps = cfg["label_smoothing"]
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps), rewards
    raise ValueError(f"loss_type '{kind}' is not one of {LOSS_TYPES}")


class PreferenceLoss:
    """The DPO family's loss for a batch of pairs, summed over pairs, with the summed metrics TRL logs.
    The frozen reference (None for the reference-free types) runs in eval mode without gradients."""

    def __init__(self, cfg, reference):
        self.cfg, self.reference = cfg, reference

    def __call__(self, model, batch):
        n = batch["idx"].size(0) // 2
        logits, _ = model(batch["idx"])
        logps, lengths = sequence_logps(logits, batch["targets"])
        ref = (None, None)
        if self.reference is not None:
            with torch.no_grad():
                ref_logps, _ = sequence_logps(self.reference(batch["idx"])[0], batch["targets"])
            ref = ref_logps[:n], ref_logps[n:]
        losses, (r_c, r_r) = preference_loss(self.cfg, logps[:n], logps[n:], lengths[:n], lengths[n:], *ref)
        if self.cfg["rpo_alpha"]:  # keeps the chosen replies likely: plain DPO lowers both log-probs
            losses = losses - self.cfg["rpo_alpha"] * logps[:n] / lengths[:n]
        stats = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
                 "rewards/accuracies": (r_c > r_r).float().sum(), "rewards/margins": (r_c - r_r).sum(),
                 "logps/chosen": logps[:n].sum(), "logps/rejected": logps[n:].sum()}
        return losses.sum(), {k: v.detach() for k, v in stats.items()}


def next_token(cfg, first_cfg, device):
    return next_token_loss


def preference(cfg, first_cfg, device):
    return PreferenceLoss(cfg, load_reference(cfg, first_cfg, device))


# mode -> (its batch source, a loss factory(cfg, first_cfg, device) -> loss_fn(model, batch)); first_cfg is
# the config the run began with (a resumed run's is in its checkpoint). A new mode (KTO, a reward model)
# is a Batches subclass if its data differs, a loss, and one line here.
MODES = {
    "pretrain": (PretrainBatches, next_token),
    "sft": (SFTBatches, next_token),
    "dpo": (PreferenceBatches, preference),
}


def to_device(batch, device):
    pin = device.startswith("cuda")
    return {k: (v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)) for k, v in batch.items()}


@torch.no_grad()
def estimate_loss(model, batches, loss_fn, cfg, ctx, device, rank, world):
    """Mean loss per counted term over eval_iters fixed batches of each split, shared out over the ranks.
    A fresh seeded generator: every eval sees the same batches and the training stream is untouched."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(cfg["seed"] + 1)
        totals = {}  # summed loss, count and the mode's metrics
        # every rank runs as many forwards as the others (FSDP's are collective); the spares are not counted
        for i in range(math.ceil(cfg["eval_iters"] / world) * world):
            batch = batches.get(split, cfg["batch_size"], g)
            if i % world == rank:
                batch = to_device(batch, device)
                with ctx:
                    loss, stats = loss_fn(model, batch)
                for k, v in {"loss": loss, "count": batches.count(batch), **stats}.items():
                    v = v.float() if i < cfg["eval_iters"] else torch.zeros_like(v, dtype=torch.float)
                    totals[k] = totals.get(k, 0) + v
        keys = sorted(totals)
        sums = torch.stack([totals[k] for k in keys])
        if world > 1:
            dist.all_reduce(sums)
        means = dict(zip(keys, (sums / sums[keys.index("count")].clamp(min=1)).tolist()))
        out[split] = means.pop("loss")
        means.pop("count")
        if split == "val":
            out.update(means)
    model.train()
    return out


def read_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"checkpoint '{path}' cannot be loaded: {type(e).__name__}: {e}")


def model_config(cfg, vocab_size, ckpt):
    """The architecture: from the config when training from scratch, else the checkpoint's."""
    if ckpt is None:
        # round the vocabulary up to a multiple of 64 for faster matmuls; the extra rows are never targets
        return GPTConfig(vocab_size=64 * math.ceil(vocab_size / 64), **{k: cfg[k] for k in MODEL_KEYS})
    if cfg["init_from"] == "resume":  # the run must go on as it was configured (dropout may change)
        saved = {**ckpt["model_config"], **ckpt["config"]}  # the run's settings, or its model's for a key it lacks
        diff = [f"{k}={cfg[k]} here but {saved[k]} in the checkpoint" for k in MODEL_KEYS
                if k != "dropout" and cfg[k] != saved[k]]
        if diff:
            fail("cannot resume: this config's model differs from the checkpoint's run: " + ", ".join(diff))
    if cfg["block_size"] > ckpt["model_config"]["block_size"]:
        fail(f"block_size={cfg['block_size']} exceeds the checkpoint's {ckpt['model_config']['block_size']}")
    if vocab_size > ckpt["model_config"]["vocab_size"]:
        fail(f"the data's vocab_size {vocab_size} exceeds the checkpoint's {ckpt['model_config']['vocab_size']}")
    return config_from_checkpoint(ckpt, cfg["dropout"])


def load_reference(cfg, first_cfg, device):
    """The frozen reference policy for DPO: ref_from, or the checkpoint the run first started from."""
    if cfg["loss_type"] in REFERENCE_FREE:
        return None
    path = cfg["ref_from"] or first_cfg["ref_from"] or first_cfg["init_from"]
    if path in ("scratch", "resume"):
        fail("mode='dpo' needs init_from (or ref_from) to name the SFT checkpoint: the reference policy")
    return GPT.from_checkpoint(read_checkpoint(path)).to(device).eval().requires_grad_(False)

# ----------------------------------------------------------------------------- set-up


def check_config(cfg, world):
    """Refuse, naming the key, what the run cannot do: before any data is read."""
    unit = (lambda v: 0 <= v < 1, "in [0, 1)")
    require(cfg, {
        "out_dir": NOT_EMPTY, "dataset": NOT_EMPTY, "mode": one_of(*MODES),
        "batch_size": AT_LEAST_1, "block_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1,
        "eval_iters": AT_LEAST_1, "log_interval": AT_LEAST_1, "max_bad_steps": AT_LEAST_1,
        "max_iters": NON_NEGATIVE,
        "learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE, "beta1": unit, "beta2": unit,
        "optimizer": one_of("adamw", "muon"), "muon_lr": POSITIVE, "muon_momentum": unit,
        "warmup_iters": (lambda v: v >= -1, ">= 0, or -1 for 1% of max_iters"),
        "min_lr": (lambda v: v == -1 or 0 <= v <= cfg["learning_rate"], "in [0, learning_rate], or -1 for 10% of it"),
        "grad_clip": (lambda v: 0 <= v < math.inf, ">= 0 (0 = off)"), "spike_factor": NON_NEGATIVE,
        "beta": POSITIVE, "rpo_alpha": NON_NEGATIVE, "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
        "simpo_gamma": (math.isfinite, "finite"), "orpo_lambda": NON_NEGATIVE,
        "dtype": one_of(*DTYPES), "peak_flops": NON_NEGATIVE, "dist_timeout": POSITIVE,
        "init_from": NOT_EMPTY, "parallel": one_of("ddp", "fsdp"), "replay": unit,
    })
    try:
        GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})
    except ValueError as e:
        fail(str(e))
    if cfg["gradient_accumulation_steps"] % world:
        fail(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be a multiple of "
             f"the {world} processes")
    if cfg["mode"] == "dpo" and cfg["loss_type"] not in LOSS_TYPES:
        fail(f"loss_type '{cfg['loss_type']}' is not one of {LOSS_TYPES}")
    if cfg["replay"] > 0 and (cfg["mode"] != "sft" or not cfg["replay_dataset"]):
        fail(f"replay={cfg['replay']} mixes pretraining windows into SFT: it needs mode='sft' and a "
             f"replay_dataset (a pretraining dataset under data_root)")
    if cfg["parallel"] == "fsdp" and cfg["optimizer"] == "muon":
        fail("optimizer='muon' orthogonalizes whole matrices, which parallel='fsdp' splits over the processes: "
             "use optimizer='adamw' with FSDP, or parallel='ddp'")


def start_checkpoint(cfg, fsdp):
    """The checkpoint the run starts from (None from scratch): out_dir/ckpt.pt, or under FSDP the state of
    out_dir's sharded checkpoint (its folder in 'shards'; the weights are read after sharding). A new run
    never silently replaces the checkpoint of another in its out_dir."""
    own, shards = os.path.join(cfg["out_dir"], "ckpt.pt"), parallel.latest_shards(cfg["out_dir"])

    def sharded_state():
        try:
            return {**parallel.read_state(shards), "shards": shards}
        except ValueError as e:
            fail(str(e))

    if cfg["init_from"] == "resume":
        if fsdp:
            if shards is None:
                fail(f"'{cfg['out_dir']}' holds no sharded checkpoint (shards/latest) to resume with parallel='fsdp'"
                     + (": resume its ckpt.pt with parallel='ddp'" if os.path.exists(own) else ""))
            return sharded_state()
        if shards is not None and not os.path.exists(own):
            fail(f"'{cfg['out_dir']}' holds a sharded checkpoint but no ckpt.pt: resume with --parallel=fsdp "
                 f"under torchrun, or write ckpt.pt with: python parallel.py {cfg['out_dir']}")
        ckpt = read_checkpoint(own)
        if "optimizer" not in ckpt:  # e.g. one that export.py imported: a start, not a run to go on with
            fail(f"{own} holds no training state to resume: start from it with init_from={own}")
        if shards is not None and sharded_state()["iter_num"] > ckpt["iter_num"]:
            fail(f"'{shards}' is newer than {own}: resume with --parallel=fsdp under torchrun, or bring "
                 f"ckpt.pt up to date with: python parallel.py {cfg['out_dir']}")
        if cfg["optimizer"] != ckpt["config"].get("optimizer", "adamw"):
            fail(f"cannot resume with optimizer={cfg['optimizer']}: {own} was trained with "
                 f"{ckpt['config'].get('optimizer', 'adamw')}")
        return ckpt
    if (os.path.exists(own) or shards) and not cfg["overwrite"]:
        fail(f"'{own if os.path.exists(own) else shards}' exists: continue that run with --init_from=resume, "
             f"choose another out_dir, or pass --overwrite=True to replace it")
    return None if cfg["init_from"] == "scratch" else read_checkpoint(cfg["init_from"])


def restore(cfg, ckpt, batches, device, fsdp, bf16):
    """The model, its optimizer and the run's progress: from scratch, from a checkpoint's weights
    (init_from=PATH), or everything as it was saved (init_from='resume': optimizer, iteration, the data
    position and the random number generators, so the run goes on exactly). fsdp: the model is sharded
    over the processes (parallel.shard_model) before any weight is loaded."""
    config = model_config(cfg, batches.meta["vocab_size"], ckpt)
    model = parallel.shard_model(config, device, bf16) if fsdp else GPT(config)
    if ckpt is not None and not fsdp:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                           device.split(":")[0], cfg["optimizer"], cfg["muon_lr"], cfg["muon_momentum"])
    if ckpt is not None and fsdp:
        if "shards" in ckpt:
            parallel.load_sharded(ckpt["shards"], model, optimizer)
        else:
            parallel.load_full_weights(model, ckpt["model"])
    sampler = torch.Generator().manual_seed(cfg["seed"])  # draws every batch; its state is the data position
    progress = {"iter_num": 0, "best_val_loss": float("inf"), "loss_ema": None, "first_cfg": cfg}
    if cfg["init_from"] == "resume":
        if not fsdp:
            optimizer.load_state_dict(ckpt["optimizer"])
        progress.update({k: ckpt[k] for k in ("iter_num", "best_val_loss", "loss_ema")}, first_cfg=ckpt["config"])
        sampler.set_state(ckpt["rng"]["sampler"])
        batches.load_state(ckpt["data_state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.startswith("cuda") and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return model, optimizer, sampler, progress


class Log:
    """metrics.jsonl (and wandb) on the master process."""

    def __init__(self, cfg, master, resume_at=None):
        """resume_at: the file's size when the resumed checkpoint was saved; what a run wrote after it
        (and will write again) is cut, so readers see one curve. A new run starts the file afresh."""
        self.file = self.wandb = None
        if master:
            os.makedirs(cfg["out_dir"], exist_ok=True)
            path = os.path.join(cfg["out_dir"], "metrics.jsonl")
            self.file = open(path, "a" if cfg["init_from"] == "resume" else "w")
            if resume_at is not None and resume_at <= self.file.tell():
                self.file.truncate(resume_at)
                self.file.seek(resume_at)
            if cfg["wandb_log"]:
                import wandb
                self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    def __call__(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])

    def tell(self):
        """The file's size so far (on the master process): a resumed run cuts the file back to it."""
        return self.file.tell() if self.file else None

    def close(self):
        if self.file:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def train_step(model, batches, loss_fn, sampler, cfg, ctx, device, rank, world):
    """Forward and backward over the step's micro-batches, accumulating gradients; returns the step's loss.
    One shared draw of the whole step's micro-batches; this rank takes its slice. Every mode's loss is a
    sum over counted terms; the step's loss is the sum over all micro-batches and ranks divided by the
    total count, so each term weighs the same however the batch is split."""
    accum = cfg["gradient_accumulation_steps"] // world
    step = [batches.next_train(cfg["batch_size"], sampler) for _ in range(accum * world)]
    micro = [to_device(b, device) for b in step[rank * accum:(rank + 1) * accum]]
    n_terms = sum(batches.count(b) for b in micro).float()
    if world > 1:
        dist.all_reduce(n_terms)
    step_loss = torch.zeros((), device=device)
    try:
        for i, batch in enumerate(micro):
            if world > 1:  # reduce gradients over the ranks only after the last micro-batch
                parallel.set_gradient_sync(model, i == accum - 1)
            with ctx:
                loss = loss_fn(model, batch)[0] / n_terms * world  # DDP and FSDP average over ranks; undo it
            loss.backward()
            step_loss += loss.detach() / world
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        fail(f"a micro-batch of batch_size={cfg['batch_size']} x block_size={cfg['block_size']} does not fit "
             f"in memory on {device}: lower batch_size and raise gradient_accumulation_steps")
    if world > 1:
        dist.all_reduce(step_loss)
    return step_loss

# ----------------------------------------------------------------------------- the loop


def train(cfg):
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    distributed, rank, world, device = parallel.setup(cfg)
    master, device_type = rank == 0, device.split(":")[0]
    fsdp = distributed and cfg["parallel"] == "fsdp"
    ctx = autocast_context(cfg["dtype"], device_type)
    torch.backends.cuda.matmul.allow_tf32 = True  # what stays in float32 on CUDA uses tensor cores
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["seed"])  # same on every rank: same init, and one shared batch sampler
    Batches, make_loss = MODES[cfg["mode"]]
    data_dir = os.path.join(cfg["data_root"], cfg["dataset"])
    ckpt = start_checkpoint(cfg, fsdp)
    resuming = cfg["init_from"] == "resume"
    checked = dict(ckpt.get("data_checked", {})) if resuming else {}  # token files already scanned
    batches = Batches(data_dir, cfg, checked)
    bf16_weights = fsdp and device_type == "cuda" and ctx._enabled  # FSDP's mixed precision on GPUs
    raw_model, optimizer, sampler, progress = restore(cfg, ckpt, batches, device, fsdp, bf16_weights)
    loss_fn = make_loss(cfg, progress["first_cfg"], device)
    model = torch.compile(raw_model) if cfg["compile"] else raw_model
    if distributed and not fsdp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)

    warmup = cfg["warmup_iters"] if cfg["warmup_iters"] >= 0 else max(1, cfg["max_iters"] // 100)
    min_lr = cfg["min_lr"] if cfg["min_lr"] >= 0 else 0.1 * cfg["learning_rate"]
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    peak = cfg["peak_flops"] or next((v for k, v in PEAK_BF16_FLOPS.items() if device_type == "cuda"
                                      and k in torch.cuda.get_device_name(device)), 0.0)
    flops_per_iter = raw_model.flops_per_token(cfg["block_size"]) * tokens_per_iter
    bytes_per_token = batches.meta.get("bytes_per_token")
    try:
        tokenizer = inline_spec(batches.meta.get("tokenizer", "bytes"), data_dir)  # checkpoints carry it whole
    except ValueError as e:
        fail(f"'{data_dir}/meta.json': {e}")
    stop_at = cfg["max_iters"] if cfg["stop_at_iter"] < 0 else min(cfg["stop_at_iter"], cfg["max_iters"])
    log = Log(cfg, master, ckpt.get("metrics_bytes") if resuming else None)
    del ckpt  # its tensors are in the model and optimizer now
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens per step, {world} "
              f"process(es) x {cfg['gradient_accumulation_steps'] // world} micro-batches of {cfg['batch_size']}x"
              f"{cfg['block_size']}, {'bfloat16 autocast' if ctx._enabled else 'float32'} on {device}"
              + (", FSDP" if fsdp else ", DDP" if distributed else ""))

    last_saved = progress["iter_num"] if resuming else None

    def checkpoint(val_loss=None):
        """Save the run, unless it has diverged: non-finite weights or val loss are never written."""
        nonlocal last_saved
        if iter_num == last_saved:  # a resumed run that took no step: its checkpoint is this one
            return
        bad = ("val loss" if val_loss is not None and not math.isfinite(val_loss)
               else "weights" if not parallel.all_finite(raw_model.parameters()) else None)
        if bad:
            if master:
                print(f"iter {iter_num}: not saving a checkpoint: non-finite {bad} ({kept()})")
            return
        last_saved = iter_num
        rng = {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}  # the same on every rank
        if device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"model_config": asdict(raw_model.config), "config": cfg, "iter_num": iter_num,
                 "best_val_loss": progress["best_val_loss"], "loss_ema": loss_ema, "rng": rng,
                 "data_state": batches.state(), "tokenizer": tokenizer, "data_meta": batches.meta,
                 "data_checked": checked, "metrics_bytes": log.tell()}
        if fsdp:  # every process writes its shards
            parallel.save_sharded(state, raw_model, optimizer, cfg["out_dir"], iter_num)
        elif master:
            parallel.save_checkpoint({**state, "model": raw_model.state_dict(),
                                      "optimizer": optimizer.state_dict()}, cfg["out_dir"])

    def kept():
        return "this run saved no checkpoint" if last_saved is None else f"the checkpoint of iter {last_saved} is kept"

    iter_num, loss_ema, start_iter = progress["iter_num"], progress["loss_ema"], progress["iter_num"]
    bad_steps, t_last, iters_timed = 0, time.perf_counter(), 0
    while True:
        resumed_here = iter_num == start_iter and start_iter > 0  # evaluated before the checkpoint was saved
        eval_due = cfg["eval_interval"] > 0 and (iter_num % cfg["eval_interval"] == 0 or iter_num == stop_at)
        if eval_due and not resumed_here:
            losses = estimate_loss(model, batches, loss_fn, cfg, ctx, device, rank, world)
            record = {"iter": iter_num, "train_loss": losses.pop("train"), "val_loss": losses.pop("val"),
                      **losses}  # and a mode's own metrics on val (DPO: rewards/..., logps/...)
            if bytes_per_token:
                record["val_bpb"] = record["val_loss"] / math.log(2) / bytes_per_token
            if master:
                print(f"eval {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "iter"))
            log(record)
            improved = record["val_loss"] < progress["best_val_loss"]
            progress["best_val_loss"] = min(progress["best_val_loss"], record["val_loss"])
            stopping_early = iter_num == stop_at and stop_at < cfg["max_iters"]
            if iter_num > 0 and (improved or cfg["always_save_checkpoint"] or stopping_early):
                checkpoint(record["val_loss"])
            t_last, iters_timed = time.perf_counter(), 0  # keep eval out of the step timings
        if iter_num >= stop_at:
            break

        lr = get_lr(iter_num, cfg["learning_rate"], min_lr, warmup, cfg["max_iters"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's matrices: muon_lr at the peak
        step_loss = train_step(model, batches, loss_fn, sampler, cfg, ctx, device, rank, world)
        norm = parallel.full(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] or float("inf")))
        loss_val, norm_val = torch.stack([step_loss, norm.float()]).tolist()  # the step's one host sync
        spike = cfg["spike_factor"] > 0 and loss_ema is not None and loss_val > cfg["spike_factor"] * loss_ema
        if not math.isfinite(loss_val) or not math.isfinite(norm_val) or spike:  # skip this update
            bad_steps += 1
            reason = "spike" if spike else "non-finite"
            if master:
                print(f"iter {iter_num}: skipped update ({reason} loss {loss_val:.4f}, grad norm {norm_val:.4g}, "
                      f"running mean {loss_ema or float('nan'):.4f})")
            log({"iter": iter_num, "skipped": reason, "loss": loss_val if math.isfinite(loss_val) else None})
            if bad_steps >= cfg["max_bad_steps"]:
                fail(f"{bad_steps} bad steps in a row at iter {iter_num}: stopping ({kept()}). Lower "
                     f"learning_rate or check the data.")
        else:
            bad_steps = 0
            optimizer.step()
            loss_ema = loss_val if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_val
            if iter_num == start_iter and master:
                print(f"weights, gradients and optimizer state: "
                      f"{parallel.state_bytes(raw_model, optimizer) / 2**20:.3f} MiB in this process")
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        iters_timed += 1

        if iter_num % cfg["log_interval"] == 0 and master:
            dt = (time.perf_counter() - t_last) / iters_timed
            t_last, iters_timed = time.perf_counter(), 0
            record = {"iter": iter_num, "loss": loss_val, "lr": lr, "grad_norm": norm_val,
                      "ms_per_iter": 1000 * dt, "tokens_per_s": tokens_per_iter / dt}
            if peak:
                record["mfu"] = flops_per_iter / dt / peak
            print(f"iter {iter_num}: loss {loss_val:.4f}, lr {lr:.2e}, {1000 * dt:.1f} ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {100 * record['mfu']:.1f}%" if peak else ""))
            log(record)

    if cfg["eval_interval"] <= 0:
        checkpoint()
    log.close()
    if fsdp and last_saved is not None and master:
        print(f"wrote {os.path.join(cfg['out_dir'], 'ckpt.pt')} (iter {parallel.consolidate(cfg['out_dir'])}, "
              f"consolidated from the shards)")
    if distributed:
        dist.barrier()  # rank 0 may still be writing the checkpoint: leave together
        dist.destroy_process_group()


if __name__ == "__main__":
    train(configure(defaults, doc_files=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")]))

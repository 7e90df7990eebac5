"""
One training loop for every stage. A mode is its data (a batch source from batches.py) and its loss:

    pretrain   next-token prediction on token memmaps
    sft        next-token prediction on the assistant's tokens of chat examples
    dpo        the DPO family's losses on preference pairs, against a frozen reference model
    rm         a reward model: a scalar head trained on preference pairs with the Bradley-Terry loss
    rl         on-policy RL: sampled replies scored by the tasks' checkers (or a reward model), a
               policy-gradient step with group-relative advantages and a KL penalty to a frozen reference

    python train.py config/pretrain_tiny.py                        # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train.py config/pretrain.py        # DDP on one node
    torchrun --nproc_per_node=8 train.py config/pretrain_1b.py     # FSDP: weights and state sharded
    python train.py config/pretrain_tiny.py --init_from=resume     # continue exactly where it stopped

The file reads top to bottom: the defaults, the losses, the modes, the set-up, one step, then train().
"""
import math
import os
import sys
import time
from dataclasses import fields, replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import parallel
import tasks
from batches import DatasetError, PreferenceBatches, PretrainBatches, RewardBatches, SFTBatches, TaskPrompts, to_device
from engine import (completion_rows, generate, left_pad, sequence_logps, text_of, token_logps, until_stop,
                    whole_rows)
from configurator import AT_LEAST_1, NON_NEGATIVE, NOT_EMPTY, POSITIVE, configure, one_of, require
from model import GPT, GPTConfig
from optim import configure_optimizer
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
    # mode='rl': batch_size prompts of the verifiable tasks per micro-batch, rl_samples replies each, scored
    # and followed by a policy-gradient step with a KL penalty of weight beta to the reference (ref_from)
    rl_tasks=[],                # names in tasks.TASKS whose train-split prompts are drawn ([] = all)
    rl_samples=8,               # replies per prompt: each reply's advantage is against its group's others
    rl_temperature=1.0,
    rl_max_new_tokens=64,
    rl_advantage="rloo",        # 'rloo' | 'grpo': see group_advantages
    task_reward=True,           # the tasks' checker: 1 for the exact answer, else 0
    reward_model="",            # a mode='rm' checkpoint: its score is added to the reward
    # system
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="auto",               # 'bfloat16' autocast, 'float32', or 'auto': bfloat16 where the hardware has it
    compile=False,
    seed=1337,
    parallel="ddp",             # under torchrun: 'ddp' (whole model per process) | 'fsdp' (sharded: parallel.py)
    dist_timeout=600.0,         # seconds a process waits for the others (torchrun) before it fails
    peak_flops=0.0,             # device peak FLOP/s for MFU; 0 = known GPUs' bf16 dense peak, else no MFU
)


MODEL_KEYS = tuple(f.name for f in fields(GPTConfig)
                   if f.name not in ("vocab_size", "reward_head"))  # the data's vocabulary; the mode's head
defaults = {**{f.name: f.default for f in fields(GPTConfig) if f.name in MODEL_KEYS}, **defaults}
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")  # mode='dpo': see preference_loss
REFERENCE_FREE = ("simpo", "orpo")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}

# ----------------------------------------------------------------------------- the losses
# Each takes (model, batch) and returns (the loss summed over the batch's counted terms, {metric: summed
# value}); the step divides by the count of terms over all its micro-batches and processes.


def next_token_loss(model, batch):
    """Cross-entropy summed over the batch's targets (-100 = not a target); no extra metrics."""
    return model(batch["idx"], batch["targets"], doc_ids=batch.get("doc_ids"), reduction="sum")[1], {}


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


class DPOLoss:
    """preference_loss over a batch of pairs (the n chosen rows, then the n rejected ones), summed over the
    pairs, with the summed metrics TRL logs. The frozen reference (None for the reference-free types)
    runs in eval mode without gradients."""

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


def reward_model_loss(model, batch):
    """Bradley-Terry (Ouyang et al. 2022): -log sigma(r(x, y_w) - r(x, y_l)) summed over the pairs, r the
    reward head read at each reply's last token; with the pairs' accuracy and margin, as TRL logs them."""
    n = batch["idx"].size(0) // 2
    r = model(batch["idx"], reward_at=batch["last"])[0].float()
    r_c, r_r = r[:n], r[n:]
    stats = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(), "rewards/accuracies": (r_c > r_r).float().sum(),
             "rewards/margins": (r_c - r_r).sum()}
    return -F.logsigmoid(r_c - r_r).sum(), {k: v.detach() for k, v in stats.items()}


def group_advantages(rewards, kind):
    """rewards (prompts, G replies each) -> each reply's advantage against its own prompt's replies:
      rloo: r_i - mean_{j != i} r_j                 (REINFORCE leave-one-out, Ahmadian et al. 2024)
      grpo: (r_i - mean_j r_j) / (std_j r_j + 1e-4)  (GRPO, Shao et al. 2024)
    The group is the baseline: no value network. A group whose replies score alike teaches nothing."""
    G = rewards.size(1)
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred * G / (G - 1) if kind == "rloo" else centred / (rewards.std(1, keepdim=True) + 1e-4)


def policy_gradient_loss(logps, ref_logps, mask, advantages, beta):
    """Per reply, from its tokens' log-probs (replies, T; mask: 1 on the reply's tokens) under the policy
    pi and the frozen reference: -A * sum_t log pi(y_t) + beta * sum_t KL_t, with KL_t = e^(ref_t - pi_t) -
    (ref_t - pi_t) - 1 (Schulman's k3: on tokens sampled from pi, an unbiased and never negative
    estimate of KL(pi || ref) per token). The first term's gradient is REINFORCE's, A * grad log pi(y):
    each batch of replies serves one update, on-policy, so PPO's ratio to the sampling policy is 1 and
    its clip never acts. Returns the per-reply losses and KLs."""
    delta = ref_logps - logps
    kl = ((torch.exp(delta) - delta - 1) * mask).sum(-1)
    return -advantages * (logps * mask).sum(-1) + beta * kl, kl


class RLLoss:
    """mode='rl': for each prompt of the batch, rl_samples replies sampled from the current policy
    (replies) and their rewards (rewards); then policy_gradient_loss summed over the replies, scored with
    gradients by the (DDP-wrapped) model in one forward, with the mean reward, KL, reply length and
    pass@1 (the share of sampled replies the checker accepts)."""

    def __init__(self, cfg, prompts, reference, reward_model):
        self.cfg, self.prompts, self.reference, self.reward_model = cfg, prompts, reference, reward_model

    @torch.no_grad()
    def replies(self, policy, batch):
        """(prompt, reply) token lists, rl_samples per prompt, drawn by the policy in eval mode, all in one
        left-padded batch; a prompt's replies draw from a generator seeded with its seed alone, so they are
        the same in any batch. A reply ends with <|im_end|> or at rl_max_new_tokens. ValueError for a prompt
        that leaves no room to reply."""
        was_training, samples, end = policy.training, self.cfg["rl_samples"], self.prompts.end
        policy.eval()
        device, block_size = next(policy.parameters()).device, policy.config.block_size
        width = max(map(len, batch["prompts"]))
        if width >= block_size:
            raise ValueError(f"an RL prompt of {width} tokens leaves no room for a reply in the model's block_size "
                             f"{block_size}")
        prompts = [p for p in batch["prompts"] for _ in range(samples)]
        x, pad = left_pad(prompts, self.prompts.pad, device)
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in batch["seeds"].tolist()]
        out = generate(policy, x, min(self.cfg["rl_max_new_tokens"], block_size - width), self.cfg["rl_temperature"],
                       stop_tokens=(end,), generator=[g for g in generators for _ in range(samples)], pad=pad)
        policy.train(was_training)
        return [(prompt, row[:row.index(end) + 1] if end in row else row)
                for prompt, row in zip(prompts, out[:, width:].tolist())]

    @torch.no_grad()
    def rewards(self, seqs, answers):
        """Per reply, the tasks' verdict (1 or 0), and its reward: that verdict (task_reward) and/or the
        reward model's score."""
        enc, end, samples = self.prompts.enc, self.prompts.end, self.cfg["rl_samples"]
        passed = torch.tensor([float(tasks.check(answers[i // samples], text_of(enc, until_stop(reply, (end,)))))
                               for i, (_, reply) in enumerate(seqs)])
        reward = passed.clone() if self.cfg["task_reward"] else torch.zeros(len(seqs))
        if self.reward_model is not None:
            device = next(self.reward_model.parameters()).device
            rows = to_device(whole_rows(seqs, self.prompts.pad), str(device))
            reward += self.reward_model(rows["idx"], reward_at=rows["last"])[0].float().cpu()
        return passed, reward

    def __call__(self, model, batch):
        try:
            seqs = self.replies(getattr(model, "module", model), batch)  # sampling: past DDP's wrapper
        except ValueError as e:
            fail(str(e))
        passed, reward = self.rewards(seqs, batch["answers"])
        device = str(batch["seeds"].device)
        rows = to_device(completion_rows(seqs, self.prompts.pad), device)
        logps = token_logps(model(rows["idx"])[0], rows["targets"])
        with torch.no_grad():
            ref_logps = token_logps(self.reference(rows["idx"])[0], rows["targets"])
        advantages = group_advantages(reward.view(-1, self.cfg["rl_samples"]), self.cfg["rl_advantage"]).view(-1)
        mask = rows["targets"] != -100
        losses, kl = policy_gradient_loss(logps, ref_logps, mask, advantages.to(device), self.cfg["beta"])
        stats = {"reward": reward.sum(), "kl": kl.detach().sum(), "reply_tokens": mask.sum().float(),
                 "pass@1": passed.sum()}
        return losses.sum(), {k: v.to(device) for k, v in stats.items()}

# ----------------------------------------------------------------------------- the modes
# A new mode (KTO, say) is a Batches subclass in batches.py if its data differs, a loss above, a line
# in MODES and a branch in mode_loss.


MODES = {"pretrain": PretrainBatches, "sft": SFTBatches, "dpo": PreferenceBatches, "rm": RewardBatches,
         "rl": TaskPrompts}  # mode: its batch source


def frozen(path, device, what):
    """A checkpoint's model, in eval mode and without gradients: a reference policy or a reward model."""
    if path in ("scratch", "resume"):
        raise ValueError(f"mode='{what}' needs init_from (or ref_from) to name the SFT checkpoint: the reference policy")
    return checkpoint.load_model(path, device)[0].requires_grad_(False)


def mode_loss(cfg, device, batches):
    """The loss of cfg's mode: next-token prediction for pretraining and SFT (whose batches mark what is
    not predicted with -100); for DPO the preference loss against the frozen model of ref_from; for a
    reward model Bradley-Terry; for RL the policy gradient against the reference, rewarded by the tasks
    and/or a reward model. ValueError if a model it needs cannot be loaded or does not fit."""
    mode = cfg["mode"]
    if mode in ("pretrain", "sft"):
        return next_token_loss
    if mode == "rm":
        return reward_model_loss
    if mode == "dpo":
        return DPOLoss(cfg, None if cfg["loss_type"] in REFERENCE_FREE else frozen(cfg["ref_from"], device, mode))
    reward_model = None
    if cfg["reward_model"]:
        reward_model, _, ckpt = checkpoint.load_model(cfg["reward_model"], device)
        if not reward_model.config.reward_head:
            raise ValueError(f"reward_model '{cfg['reward_model']}' is not a reward model (train one with mode='rm')")
        if ckpt["tokenizer"] != batches.meta["tokenizer"]:
            raise ValueError(f"reward_model '{cfg['reward_model']}' has another tokenizer than the policy")
        reward_model.requires_grad_(False)
    return RLLoss(cfg, batches, frozen(cfg["ref_from"], device, mode), reward_model)

# ----------------------------------------------------------------------------- set-up


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():
        # under torchrun, leave at once: tearing down the process group and DDP's reducer while Python
        # shuts down can abort in gloo's threads ("terminate called without an active exception").
        # Everything this script writes is flushed or atomic already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(1)


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
        "beta": (lambda v: v > 0 or (v == 0 and cfg["mode"] == "rl"), "> 0 (mode='rl': >= 0; 0 = no KL penalty)"),
        "rpo_alpha": NON_NEGATIVE, "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
        "simpo_gamma": (math.isfinite, "finite"), "orpo_lambda": NON_NEGATIVE,
        "dtype": one_of(*parallel.DTYPES), "peak_flops": NON_NEGATIVE, "dist_timeout": POSITIVE,
        "init_from": NOT_EMPTY, "parallel": one_of("ddp", "fsdp"), "replay": unit,
        "rl_tasks": tasks.NAMES_RULE, "rl_samples": (lambda v: v >= 2, ">= 2: a reply is judged against the others"),
        "rl_temperature": POSITIVE, "rl_max_new_tokens": AT_LEAST_1, "rl_advantage": one_of("rloo", "grpo"),
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
    if cfg["mode"] == "rl" and not (cfg["task_reward"] or cfg["reward_model"]):
        fail("mode='rl' needs a reward: task_reward=True, a reward_model, or both")
    if cfg["mode"] == "rl" and world > 1 and cfg["parallel"] == "fsdp":
        fail("mode='rl' samples each process's own prompts, which FSDP's collective forwards cannot: use "
             "parallel='ddp'")
    if cfg["parallel"] == "fsdp" and cfg["optimizer"] == "muon":
        fail("optimizer='muon' orthogonalizes whole matrices, which parallel='fsdp' splits over the processes: "
             "use optimizer='adamw' with FSDP, or parallel='ddp'")


def model_config(cfg, vocab_size, ckpt):
    """The architecture: from the config when training from scratch, else the checkpoint's."""
    if ckpt is None:
        # round the vocabulary up to a multiple of 64 for faster matmuls; the extra rows are never targets
        return GPTConfig(vocab_size=64 * math.ceil(vocab_size / 64), reward_head=cfg["mode"] == "rm",
                         **{k: cfg[k] for k in MODEL_KEYS})
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
    config = checkpoint.model_config(ckpt, cfg["dropout"])
    if config.reward_head and cfg["mode"] != "rm":
        fail(f"'{cfg['init_from']}' is a reward model: only mode='rm' trains it further")
    return replace(config, reward_head=cfg["mode"] == "rm")  # a reward model starts from a policy


def set_up(cfg):
    """Everything a run is made of, as one namespace: its config and processes (cfg, rank, world, master,
    device, fsdp, ctx), data (batches, scanned_files), model (raw_model; model, compiled and wrapped for
    DDP), optimizer, loss_fn, sampler (draws every batch: its state is the data position), log, and
    progress (iter_num, best_val_loss, loss_ema, start_iter, last_saved). From scratch, from a checkpoint's
    weights (init_from=PATH), or all as it was saved (init_from='resume'), so the run goes on exactly."""
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    distributed, rank, world, device = parallel.setup(cfg)
    fsdp = distributed and cfg["parallel"] == "fsdp"
    ctx = parallel.autocast_context(cfg["dtype"], device.split(":")[0])
    torch.backends.cuda.matmul.allow_tf32 = True  # what stays in float32 on CUDA uses tensor cores
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["seed"])  # same on every rank: same init, and one shared batch sampler
    try:
        ckpt = checkpoint.starting_checkpoint(cfg, fsdp)
    except ValueError as e:
        fail(str(e))
    resuming = cfg["init_from"] == "resume"
    if cfg["mode"] in ("dpo", "rl"):  # the reference stays the model the run first started from
        first = ckpt["config"] if resuming else cfg
        cfg = {**cfg, "ref_from": cfg["ref_from"] or first["ref_from"] or first["init_from"]}
    scanned_files = dict(ckpt.get("scanned_files", {})) if resuming else {}  # token files already checked
    data_dir = os.path.join(cfg["data_root"], cfg["dataset"])
    try:
        if cfg["mode"] == "rl":  # no dataset: the tasks' prompts, in the tokenizer of the policy's checkpoint
            batches = TaskPrompts(cfg, ckpt)
        else:
            batches = MODES[cfg["mode"]](data_dir, cfg, scanned_files)
        tokenizer = inline_spec(batches.meta.get("tokenizer", "bytes"), data_dir)  # checkpoints carry it whole
    except DatasetError as e:
        fail(str(e))
    except ValueError as e:
        fail(f"'{data_dir}/meta.json': {e}")
    config = model_config(cfg, batches.meta["vocab_size"], ckpt)
    bf16_weights = fsdp and device.startswith("cuda") and ctx._enabled  # FSDP's mixed precision on GPUs
    raw_model = parallel.shard_model(config, device, bf16_weights) if fsdp else GPT(config)
    weights = ckpt and ckpt.get("model")
    if config.reward_head and weights is not None and "reward_head.weight" not in weights:
        weights = {**weights, "reward_head.weight": torch.zeros(1, config.n_embd)}  # a new head: every reward 0
    if weights is not None and not fsdp:
        raw_model.load_state_dict(weights)
    raw_model.to(device)
    optimizer = configure_optimizer(raw_model, cfg["learning_rate"], cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]),
                                    device.split(":")[0], cfg["optimizer"], cfg["muon_lr"], cfg["muon_momentum"])
    if ckpt is not None and fsdp:
        if "shards" in ckpt:
            checkpoint.load_sharded(ckpt["shards"], raw_model, optimizer)
        else:
            parallel.load_full_weights(raw_model, weights)
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, master=rank == 0, device=device, fsdp=fsdp, ctx=ctx,
                          distributed=distributed, batches=batches, scanned_files=scanned_files, tokenizer=tokenizer,
                          raw_model=raw_model, optimizer=optimizer, sampler=torch.Generator().manual_seed(cfg["seed"]),
                          iter_num=0, best_val_loss=float("inf"), loss_ema=None, last_saved=None)
    if resuming:
        checkpoint.restore_run(run, ckpt)
    run.start_iter = run.iter_num
    try:
        run.loss_fn = mode_loss(cfg, device, batches)
    except ValueError as e:
        fail(str(e))
    run.model = torch.compile(raw_model) if cfg["compile"] else raw_model
    if distributed and not fsdp:
        run.model = DDP(run.model, device_ids=[int(os.environ["LOCAL_RANK"])] if device.startswith("cuda") else None,
                        find_unused_parameters=cfg["mode"] == "rm")  # a reward model leaves the output head out
    run.log = checkpoint.MetricsLog(cfg, run.master, ckpt.get("metrics_bytes") if resuming else None)
    return run

# ----------------------------------------------------------------------------- a step, an evaluation, a save


def get_lr(it, lr, min_lr, warmup_iters, max_iters):
    """Linear warmup from lr/warmup_iters to lr, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def train_step(run):
    """Forward and backward over the step's micro-batches, accumulating gradients; returns the step's loss
    and the mode's metrics (means per loss term).
    One shared draw of the whole step's micro-batches; this rank takes its slice. Every mode's loss is a
    sum over counted terms; the step's loss is the sum over all micro-batches and ranks divided by the
    total count, so each term weighs the same however the batch is split."""
    cfg, world = run.cfg, run.world
    accum = cfg["gradient_accumulation_steps"] // world
    step = [run.batches.next_train(cfg["batch_size"], run.sampler) for _ in range(accum * world)]
    micro = [to_device(b, run.device) for b in step[run.rank * accum:(run.rank + 1) * accum]]
    n_terms = sum(run.batches.count(b) for b in micro).float()
    if world > 1:
        dist.all_reduce(n_terms)
    step_loss, sums = torch.zeros((), device=run.device), {}
    try:
        for i, batch in enumerate(micro):
            if world > 1:  # reduce gradients over the ranks only after the last micro-batch
                parallel.set_gradient_sync(run.model, i == accum - 1)
            with run.ctx:
                loss, stats = run.loss_fn(run.model, batch)
                loss = loss / n_terms * world  # DDP and FSDP average over ranks
            loss.backward()
            step_loss += loss.detach() / world
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.float() / n_terms
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        fail(f"a micro-batch of batch_size={cfg['batch_size']} x block_size={cfg['block_size']} does not fit "
             f"in memory on {run.device}: lower batch_size and raise gradient_accumulation_steps")
    values = torch.stack([step_loss, *sums.values()])
    if world > 1:
        dist.all_reduce(values)
    return values[0], dict(zip(sums, values[1:]))


def skip_reason(loss, grad_norm, loss_ema, spike_factor):
    """Why this step's update must not be applied (None: apply it): a NaN/inf loss or gradient norm, or
    a loss above spike_factor times the running mean of the losses before it."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        return "non-finite"
    if spike_factor > 0 and loss_ema is not None and loss > spike_factor * loss_ema:
        return "spike"
    return None


@torch.no_grad()
def estimate_loss(run):
    """Mean loss per counted term over eval_iters fixed batches of each split, shared out over the ranks,
    and the mode's own metrics on val. A fresh seeded generator: every eval sees the same batches and the
    training stream is untouched."""
    cfg, world = run.cfg, run.world
    run.model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(cfg["seed"] + 1)
        totals = {}  # summed loss, count and the mode's metrics
        # every rank runs as many forwards as the others (FSDP's are collective); the spares are not counted
        for i in range(math.ceil(cfg["eval_iters"] / world) * world):
            batch = run.batches.get(split, cfg["batch_size"], g)
            if i % world == run.rank:
                batch = to_device(batch, run.device)
                with run.ctx:
                    loss, stats = run.loss_fn(run.model, batch)
                for k, v in {"loss": loss, "count": run.batches.count(batch), **stats}.items():
                    v = v.float() if i < cfg["eval_iters"] else torch.zeros_like(v, dtype=torch.float)
                    totals[k] = totals.get(k, 0) + v
        keys = sorted(totals)
        sums = torch.stack([totals[k] for k in keys])
        if world > 1:
            dist.all_reduce(sums)
        means = dict(zip(keys, (sums / sums[keys.index("count")].clamp(min=1)).tolist()))
        out[f"{split}_loss"] = means.pop("loss")
        means.pop("count")
        if split == "val":
            out.update(means)
    run.model.train()
    return out


def finish(run):
    """The last save (a run without evals saves once at its end), the consolidated ckpt.pt of a sharded
    run, and a clean exit of every process."""
    if run.cfg["eval_interval"] <= 0:
        checkpoint.save_run(run)
    run.log.close()
    if run.fsdp and run.last_saved is not None and run.master:
        out_dir = run.cfg["out_dir"]
        print(f"wrote {os.path.join(out_dir, 'ckpt.pt')} (iter {checkpoint.consolidate(out_dir)}, consolidated "
              f"from the shards)")
    if run.distributed:
        dist.barrier()  # rank 0 may still be writing the checkpoint: leave together
        dist.destroy_process_group()

# ----------------------------------------------------------------------------- the loop


def train(cfg):
    run = set_up(cfg)
    cfg = run.cfg
    warmup = cfg["warmup_iters"] if cfg["warmup_iters"] >= 0 else max(1, cfg["max_iters"] // 100)
    min_lr = cfg["min_lr"] if cfg["min_lr"] >= 0 else 0.1 * cfg["learning_rate"]
    stop_at = cfg["max_iters"] if cfg["stop_at_iter"] < 0 else min(cfg["stop_at_iter"], cfg["max_iters"])
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    flops_per_iter = run.raw_model.flops_per_token(cfg["block_size"]) * tokens_per_iter
    peak = cfg["peak_flops"] or next((v for k, v in PEAK_BF16_FLOPS.items() if run.device.startswith("cuda")
                                      and k in torch.cuda.get_device_name(run.device)), 0.0)
    if run.master:
        per_step = (f"{cfg['batch_size'] * cfg['gradient_accumulation_steps']} prompts x {cfg['rl_samples']} replies"
                    if cfg["mode"] == "rl" else f"{tokens_per_iter:,} tokens")
        print(f"{run.raw_model.num_params() / 1e6:.2f}M parameters, {per_step} per step, {run.world} "
              f"process(es) x {cfg['gradient_accumulation_steps'] // run.world} micro-batches of {cfg['batch_size']}x"
              f"{cfg['block_size']}, {'bfloat16 autocast' if run.ctx._enabled else 'float32'} on {run.device}"
              + (", FSDP" if run.fsdp else ", DDP" if run.distributed else ""))
    bad_steps, t_last, iters_timed = 0, time.perf_counter(), 0
    while True:
        it = run.iter_num
        just_resumed = it == run.start_iter and it > 0  # evaluated before its checkpoint was saved
        if cfg["eval_interval"] > 0 and (it % cfg["eval_interval"] == 0 or it == stop_at) and not just_resumed:
            record = {"iter": it, **estimate_loss(run)}  # and the mode's metrics on val (DPO: rewards/...)
            if run.batches.meta.get("bytes_per_token"):
                record["val_bpb"] = record["val_loss"] / math.log(2) / run.batches.meta["bytes_per_token"]
            if run.master:
                print(f"eval {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "iter"))
            run.log(record)
            improved = record["val_loss"] < run.best_val_loss
            run.best_val_loss = min(run.best_val_loss, record["val_loss"])
            stopping_early = it == stop_at < cfg["max_iters"]
            if it > 0 and (improved or cfg["always_save_checkpoint"] or stopping_early):
                checkpoint.save_run(run, record["val_loss"])
            t_last, iters_timed = time.perf_counter(), 0  # keep eval out of the step timings
        if it >= stop_at:
            break

        lr = get_lr(it, cfg["learning_rate"], min_lr, warmup, cfg["max_iters"])
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's matrices: muon_lr at the peak
        step_loss, stats = train_step(run)
        norm = parallel.whole_value(torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(),
                                                                   cfg["grad_clip"] or float("inf")))
        loss, grad_norm, *values = torch.stack([step_loss, norm.float(), *stats.values()]).tolist()  # one host sync
        stats = dict(zip(stats, values))
        skip = skip_reason(loss, grad_norm, run.loss_ema, cfg["spike_factor"])
        if skip:
            bad_steps += 1
            if run.master:
                print(f"iter {it}: skipped update ({skip} loss {loss:.4f}, grad norm {grad_norm:.4g}, "
                      f"running mean {run.loss_ema or float('nan'):.4f})")
            run.log({"iter": it, "skipped": skip, "loss": loss if math.isfinite(loss) else None})
            if bad_steps >= cfg["max_bad_steps"]:
                fail(f"{bad_steps} bad steps in a row at iter {it}: stopping ({checkpoint.kept_note(run)}). Lower "
                     f"learning_rate or check the data.")
        else:
            bad_steps = 0
            run.optimizer.step()
            run.loss_ema = loss if run.loss_ema is None else 0.95 * run.loss_ema + 0.05 * loss
            if it == run.start_iter and run.master:
                print(f"weights, gradients and optimizer state: "
                      f"{parallel.state_bytes(run.raw_model, run.optimizer) / 2**20:.3f} MiB in this process")
        run.optimizer.zero_grad(set_to_none=True)
        run.iter_num += 1
        iters_timed += 1
        if run.iter_num % cfg["log_interval"] == 0 and run.master:
            dt = (time.perf_counter() - t_last) / iters_timed
            t_last, iters_timed = time.perf_counter(), 0
            record = {"iter": run.iter_num, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "ms_per_iter": 1000 * dt, "tokens_per_s": tokens_per_iter / dt, **stats}
            if peak:
                record["mfu"] = flops_per_iter / dt / peak
            print(f"iter {run.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {1000 * dt:.1f} ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {100 * record['mfu']:.1f}%" if peak else "")
                  + "".join(f", {k} {v:.3f}" for k, v in stats.items()))
            run.log(record)
    finish(run)


if __name__ == "__main__":
    train(configure(defaults, doc_files=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")]))

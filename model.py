"""
A modern decoder-only transformer, written out in full:
token embedding -> n_layer x [pre-norm attention, pre-norm SwiGLU] -> RMSNorm -> tied output head.
Attention is grouped-query with rotary position embeddings and a KV cache for generation.
The layout follows Llama (rotary rotates the two halves of each head), so weights map 1:1 to it.
"""
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """The architecture. Every field is also a config key of train.py (--n_layer=8, --rope_theta=5e5, ...):
    a field added here, with a default, can be set from a config file or the command line at once."""
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12       # n_head: multi-head; 1: multi-query; in between: grouped-query
    n_embd: int = 768
    hidden_dim: int = 0       # SwiGLU width; 0 means 8/3 * n_embd rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if not getattr(self, key) >= 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        for key in ("rope_theta", "norm_eps"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                raise ValueError(f"{key}={getattr(self, key)} must be a finite number > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.hidden_dim < 0:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be >= 0 (0: about 8/3 * n_embd)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even for rotary")
        if not self.hidden_dim:
            self.hidden_dim = 64 * math.ceil(8 * self.n_embd / 3 / 64)


def config_from_checkpoint(ckpt, dropout=0.0):
    """The GPTConfig a checkpoint dict (train.py's format) was trained with."""
    return GPTConfig(**{**ckpt["model_config"], "dropout": dropout})


def normal_init_(weight, std):
    """weight <- N(0, std), drawn whole on the CPU. A DTensor (one process's shard of the weight under
    FSDP) keeps its own part of that draw."""
    full = torch.empty(weight.shape).normal_(0.0, std).to(weight.device)
    if hasattr(weight, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None)
    weight.copy_(full)


def residual_projection(n_in, n_out):
    """A linear layer that writes into the residual stream; GPT.__init__ scales its initialization."""
    layer = nn.Linear(n_in, n_out, bias=False)
    layer.writes_residual = True
    return layer


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 for stability (RMSNormFunction)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out. Autograd through the forward's five elementwise steps runs
    about ten passes over the activations in the backward; on a CPU, where these passes are memory-bound,
    this takes half the time (bench/step_speed.py). With r = 1/sqrt(mean(x^2) + eps), x_hat = x r,
    y = x_hat w and upstream gradient g:
        dL/dx = r (g w - x_hat mean(g w x_hat))       (the mean over the normalized dimension)
        dL/dw = sum of g x_hat over all other dimensions
    tests/test_model.py checks it against autograd (gradcheck)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(xf.size(-1))  # mean(x^2)
        r = torch.rsqrt(ms + eps)
        x_hat = xf * r
        ctx.save_for_backward(x_hat, r, weight)
        return (x_hat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x_hat, r, weight = ctx.saved_tensors
        gw = g * weight
        mean_gwx = torch.linalg.vecdot(gw, x_hat, dim=-1).unsqueeze(-1).div_(x_hat.size(-1))
        dx = torch.addcmul(gw, x_hat, mean_gwx, value=-1).mul_(r)
        dw = (g * x_hat).sum(dim=tuple(range(g.dim() - 1)))
        return dx.to(g.dtype), dw.to(weight.dtype), None


def rotary_tables(head_dim, length, theta):
    """cos and sin of shape (length, head_dim/2): position m rotates pair i by m * theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate (x1, x2) = the two halves of each head by the position's angle. x: (B, H, T, D)."""
    return Rotation.apply(x, cos.to(x.dtype), sin.to(x.dtype))


def rotate_halves(x, cos, sin):
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), each half written in place into one new tensor by a
    product and a fused multiply-add: on a CPU, 2.5x (bf16) to 6x (float32) faster than four products,
    a sum, a difference and a concatenation over the strided halves of a transposed view."""
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():  # torch.compile fuses the plain formula (and fails on out= below)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


class Rotation(torch.autograd.Function):
    """rotate_halves with its gradient written out (its in-place writes are not differentiable): a
    rotation's transpose is the rotation by the opposite angle, so the backward pass rotates the gradient
    by -angle (sin negated), saving no activations."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate_halves(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return rotate_halves(g, cos, -sin), None, None


class KVCache:
    """Keys and values of every layer for the positions generated so far."""

    def __init__(self, config):
        self.n_layer, self.block_size = config.n_layer, config.block_size
        self.k = self.v = None  # allocated at the first update, in the keys' dtype (autocast decides it)
        self.pos = 0  # number of positions filled

    def update(self, layer, k, v):
        """Store k, v (B, H_kv, T, D) at the current position; return all keys and values so far."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(self.n_layer, B, H, self.block_size, D)
            self.v = torch.zeros_like(self.k)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # q, k and v projections fused into one matmul: n_head query heads, n_kv_head key and value heads
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=False)
        self.c_proj = residual_projection(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # a single new token attends to everything cached; otherwise causal (or the given mask)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))"""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.up = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.c_proj = residual_projection(config.hidden_dim, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x):
        return F.dropout(self.c_proj(F.silu(self.gate(x)) * self.up(x)), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def document_mask(doc_ids):
    """Boolean attention mask (B, 1, T, T): causal, and only within the same document."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def doc_ids_from_eot(idx, eot_token):
    """Document index of each position; the end-of-text token belongs to the document it ends."""
    ends = (idx == eot_token).long()
    return ends.cumsum(1) - ends


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        rng = torch.get_rng_state()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        head_dim = config.n_embd // config.n_head
        self.register_buffer("cos", torch.empty(config.block_size, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(config.block_size, head_dim // 2), persistent=False)
        # the layers drew their default initializations from the generator (on the meta device they draw
        # nothing): rewind it, so the weights depend on the seed alone, however the model was built
        torch.set_rng_state(rng)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every weight N(0, 0.02) from torch's global generator, in module order; then the projections
        that write into the residual stream drawn again at 0.02/sqrt(2*n_layer) (GPT-2: the stream's
        variance does not grow with depth); norm gains 1; the rotary tables. A model built on the meta
        device and sharded (parallel.py) calls it again once its shards exist: each draws the whole
        tensor and keeps its part, so every split starts from the weights of one process."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal_init_(module.weight, 0.02)
        for module in self.modules():
            if getattr(module, "writes_residual", False):
                normal_init_(module.weight, 0.02 / math.sqrt(2 * self.config.n_layer))
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        c = self.config
        cos, sin = rotary_tables(c.n_embd // c.n_head, c.block_size, c.rope_theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    @classmethod
    def from_checkpoint(cls, ckpt, dropout=0.0):
        """The model a checkpoint dict (train.py's format) describes, with its weights."""
        model = cls(config_from_checkpoint(ckpt, dropout))
        model.load_state_dict(ckpt["model"])
        return model

    @classmethod
    def load(cls, path, device="cpu"):
        """(model in eval mode, checkpoint dict) from out_dir/ckpt.pt or a .pt path that train.py wrote.
        Raises FileNotFoundError or ValueError naming the file."""
        file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint '{file}' not found")
        try:
            ckpt = torch.load(file, map_location=device, weights_only=True)
            return cls.from_checkpoint(ckpt).to(device).eval(), ckpt
        except Exception as e:  # truncated, not a checkpoint, or from an incompatible version
            raise ValueError(f"checkpoint '{file}' cannot be loaded: {type(e).__name__}: {e}") from e

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token: 6 per weight, plus the attention scores and
        weighted sum (PaLM appendix B). The embedding lookup is free, but the tied head is a real matmul."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * T

    def forward(self, idx, targets=None, doc_ids=None, cache=None, reduction="mean"):
        """idx (B, T) token ids -> logits (B, T, vocab) and, given targets (-100 = ignore), the loss.
        doc_ids (B, T) restricts attention to each position's own document (packed sequences)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        mask = None
        if doc_ids is not None:
            mask = document_mask(doc_ids)
        elif cache is not None and start > 0 and T > 1:  # several new tokens after a cached prefix
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction=reduction)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                             muon_lr=0.02, muon_momentum=0.95):
        """AdamW; weight decay only on matrices (not on norm gains); the fused kernel on CUDA.
        optimizer='muon': Muon for the matrices inside the blocks, AdamW for the embedding, the head and
        the norm gains. Muon's group carries lr_ratio, its learning rate over learning_rate, so one
        schedule drives them all (train.py sets lr = schedule * lr_ratio, a missing ratio being 1)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if optimizer == "adamw":
            groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
        hidden = {id(p) for p in self.blocks.parameters() if p.dim() == 2}
        return Muon([
            {"params": [p for p in params if id(p) in hidden], "use_muon": True, "lr": muon_lr,
             "lr_ratio": muon_lr / learning_rate, "momentum": muon_momentum, "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in hidden and p.dim() >= 2], "use_muon": False,
             "lr": learning_rate, "betas": betas, "eps": 1e-8, "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "use_muon": False, "lr": learning_rate,
             "betas": betas, "eps": 1e-8, "weight_decay": 0.0},
        ])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                 use_cache=True, generator=None):
        """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.
        Stops early once every row has produced one of stop_tokens.
        The context window: a prompt longer than block_size is cropped to its last block_size tokens; when
        the window fills up, the oldest half is dropped and the rest re-encoded (a cache refill). The
        no-cache path uses the same window, so both paths see the same context and agree exactly."""
        bs = self.config.block_size
        idx = idx[:, -bs:]
        window_start = 0        # the model sees idx[:, window_start:]
        cache = None
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if idx.size(1) - window_start >= bs:  # full: keep the newest half
                window_start = idx.size(1) - bs // 2
                cache = None
            if not use_cache:
                logits, _ = self(idx[:, window_start:])
            elif cache is None:
                cache = KVCache(self.config)
                logits, _ = self(idx[:, window_start:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            next_id = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_id), dim=1)
            if len(stop):
                done |= torch.isin(next_id[:, 0], stop)
                if done.all():
                    break
        return idx


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, its tokenizer, the checkpoint dict) of out_dir/ckpt.pt or a .pt file, for the
    scripts that sample and evaluate; exits naming a missing or unreadable file."""
    from tokenizer import load_tokenizer
    try:
        model, ckpt = GPT.load(path, device)
        return model, load_tokenizer(ckpt["tokenizer"]), ckpt
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    except KeyError:
        sys.exit(f"checkpoint '{path}' holds no tokenizer: it was not written by train.py or export.py")


def chat_reply(model, enc, messages, num_samples=1, max_new_tokens=128, temperature=0.0, top_k=None,
               top_p=None, generator=None):
    """The model's next assistant message(s) after `messages` in the chat template of tokenizer.py;
    generation stops at <|im_end|>."""
    return chat_replies(model, enc, [messages], num_samples, max_new_tokens, temperature, top_k, top_p,
                        generator)[0]


def chat_replies(model, enc, conversations, num_samples=1, max_new_tokens=128, temperature=0.0, top_k=None,
                 top_p=None, generator=None, batch_rows=64):
    """chat_reply for many conversations at once: those whose prompts have the same number of tokens
    generate together, up to batch_rows rows at a time. No padding, so a greedy reply in a batch is the
    reply the conversation gets alone (tests/test_evaluate.py). Sampled replies depend on the batches."""
    from tokenizer import render_chat
    prompts = [render_chat(enc, messages, generation_prompt=True)[0] for messages in conversations]
    device = next(model.parameters()).device
    end = enc.encode_single_token("<|im_end|>")
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    replies = [None] * len(prompts)
    per_batch = max(1, batch_rows // num_samples)
    for length, group in sorted(by_length.items()):
        for start in range(0, len(group), per_batch):
            batch = group[start:start + per_batch]
            x = torch.tensor([prompts[i] for i in batch for _ in range(num_samples)], dtype=torch.long, device=device)
            out = model.generate(x, max_new_tokens, temperature, top_k, top_p, stop_tokens=(end,), generator=generator)
            rows = out[:, min(length, model.config.block_size):].tolist()
            for j, i in enumerate(batch):
                replies[i] = [decode_reply(enc, row, end) for row in rows[j * num_samples:(j + 1) * num_samples]]
    return replies


def decode_reply(enc, row, end):
    """A generated row's text up to the end token, without the vocabulary's padding ids."""
    row = row[:row.index(end)] if end in row else row
    return enc.decode([t for t in row if t < enc.n_vocab])


def orthogonalize(G, steps=5):
    """Approximately U V^T of G = U S V^T: every singular value pushed to about 1 (into [0.7, 1.2]) by a
    quintic Newton-Schulz iteration, X <- a X + b (X X^T) X + c (X X^T)^2 X, after scaling G to norm 1.
    The coefficients (3.4445, -4.7750, 2.0315) are Keller Jordan's: they make small singular values
    grow fast at the price of not converging exactly to 1. Only matrix products: cheap on a GPU."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for the groups with use_muon; AdamW for the rest. For a weight W
    (out x in) with gradient G:
        M <- mu M + G                          (momentum)
        U <- orthogonalize(G + mu M)           (Nesterov; every direction of the update gets the same size)
        W <- W (1 - lr wd) - lr max(1, out/in)^0.5 U
    The other groups follow torch.optim.AdamW's formulas (decoupled weight decay, bias correction).
    Every process of a DDP run holds the same all-reduced gradients and computes the whole update
    itself: the weights stay identical, at the cost of repeating the orthogonalization on each rank."""

    def __init__(self, groups):
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    mu = group["momentum"]
                    if not state:
                        state["momentum"] = torch.zeros_like(p)
                    m = state["momentum"].mul_(mu).add_(p.grad)
                    update = orthogonalize(p.grad + mu * m) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.mul_(1 - lr * wd).add_(update, alpha=-lr)
                else:
                    (b1, b2), eps = group["betas"], group["eps"]
                    if not state:  # the step count is a Python int: reading a tensor's would sync a GPU
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] = t = state["step"] + 1
                    state["exp_avg"].lerp_(p.grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(eps)
                    p.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))


DTYPES = ("auto", "bfloat16", "float32")  # the values of the scripts' dtype key


def autocast_context(dtype, device_type):
    """torch.autocast for dtype 'bfloat16', 'float32' (autocast off) or 'auto': bfloat16 on CUDA GPUs that
    support it and on CPUs with native bf16 instructions (AVX512-BF16/AMX); float32 elsewhere, where bf16
    is emulated and slower than float32 (10x on an AVX2-only CPU)."""
    if dtype == "auto":
        fast = (torch.cuda.is_bf16_supported() if device_type == "cuda"
                else getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        dtype = "bfloat16" if fast else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype '{dtype}' is not supported: use 'auto', 'bfloat16' or 'float32'")
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # drop the tail outside the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)

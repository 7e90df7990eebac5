"""
A modern decoder-only transformer, written out in full:

    token embedding -> n_layer x Block -> RMSNorm -> output head (tied to the embedding)
    Block: x = x + Attention(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))

Attention is grouped-query with rotary position embeddings and a KV cache for generation. The layout
follows Llama (rotary rotates the two halves of each head), so the weights map one to one to it
(export.py). Read top to bottom: the config, the norm, rotary, attention and its cache, the MLP, the
block, and the model. The decoding loop that fills the cache lives in engine.py (generate).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """The architecture. Every field but vocab_size and reward_head (the data's and the mode's) is also a
    config key of train.py (--n_layer=8, --rope_theta=5e5, ...): a field added here, with a default, can
    be set from a config file or the command line at once."""
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
    reward_head: bool = False  # a scalar head beside the output head: a reward model (set by train.py's mode='rm')

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


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32: the mean of squares of bf16 numbers
    loses too much precision."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return y.type_as(x)


def rotary_tables(head_dim, length, theta):
    """cos and sin of shape (length, head_dim/2): position m rotates pair i by the angle
    m * theta^(-2i/head_dim), so low pairs turn fast and high pairs slowly. Computed in float64."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x1[i], x2[i]) of the two halves of every head by its position's angle, as a complex
    number times e^(i angle) would be. x: (B, H, T, D). The dot product of a rotated query and key then
    depends only on their distance. Computed in float32 and rounded once: rounding each product to bf16
    measurably worsens a trained model."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


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


def residual_projection(n_in, n_out):
    """A linear layer that writes into the residual stream; GPT.init_weights scales its initialization."""
    layer = nn.Linear(n_in, n_out, bias=False)
    layer.writes_residual = True
    return layer


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
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.c_attn(x).view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)  # (B, heads, T, D)
        qk = apply_rotary(qkv[:, :H + Hkv], cos, sin)  # the query and key heads rotate in one call
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
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
        if config.reward_head:
            self.reward_head = nn.Linear(config.n_embd, 1, bias=False)
        head_dim = config.n_embd // config.n_head
        self.register_buffer("cos", torch.empty(config.block_size, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(config.block_size, head_dim // 2), persistent=False)
        torch.set_rng_state(rng)  # init_weights replaces the layers' default draws: the seed alone decides
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, normal_=nn.init.normal_):
        """Every matrix N(0, 0.02), in module order; then the projections that write into the residual
        stream again at 0.02/sqrt(2 n_layer), so the stream's variance does not grow with depth (GPT-2);
        norm gains 1; the rotary tables. normal_(weight, mean, std) draws: parallel.py passes one that
        draws a sharded weight whole, so a model split over processes starts as one process's does."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                normal_(module.weight, 0.0, 0.02)
        for module in self.modules():
            if getattr(module, "writes_residual", False):
                normal_(module.weight, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        c = self.config
        cos, sin = rotary_tables(c.n_embd // c.n_head, c.block_size, c.rope_theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token: 6 per weight, plus the attention scores and
        weighted sum (PaLM appendix B). The embedding lookup is free, but the tied head is a real matmul."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    def forward(self, idx, targets=None, doc_ids=None, cache=None, reduction="mean", reward_at=None, pad=None):
        """idx (B, T) token ids -> logits (B, T, vocab) and, given targets (-100 = ignore), the loss.
        doc_ids (B, T) restricts attention to each position's own document (packed sequences).
        pad (B,) counts each row's left padding (generation of prompts of unequal length): a row's
        positions count from its first real token and nothing attends to its padding.
        A reward model, given reward_at (B,) positions, returns instead each row's scalar reward read
        there (the reply's last token), and None."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        mask = None
        if doc_ids is not None:
            mask = document_mask(doc_ids)
        elif pad is not None:
            cols, keys = torch.arange(start, start + T, device=idx.device), torch.arange(start + T, device=idx.device)
            pos = (cols - pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, T, D/2)
            # causal, never to padding; a padding position sees itself, so no row of the softmax is empty
            mask = (keys <= cols[:, None]) & ((keys >= pad[:, None, None]) | (keys == cols[:, None]))
            mask = mask[:, None]  # (B, 1, T, start + T)
        elif cache is not None and start > 0 and T > 1:  # several new tokens after a cached prefix
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if reward_at is not None:
            return self.reward_head(x[torch.arange(B, device=x.device), reward_at]).squeeze(-1), None
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction=reduction)
        return logits, loss

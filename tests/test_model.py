import math

import pytest
import torch
import torch.nn.functional as F

from engine import generate, sample_next
from model import GPT, GPTConfig, RMSNorm, apply_rotary, doc_ids_from_eot, rotary_tables
from optim import configure_optimizer


def tiny(**kw):
    args = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args)).eval()


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # bf16 in, bf16 out, computed in float32: the float64 result rounded once to bf16
    xb = (x * 100).bfloat16()
    x64 = xb.double()
    exact = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb), exact.bfloat16(), atol=0, rtol=0)


def test_rotary_matches_complex_rotation_and_is_relative():
    D, T = 16, 20
    cos, sin = rotary_tables(D, T, theta=10000.0)
    x = torch.randn(1, 1, T, D)
    rot = apply_rotary(x, cos, sin)
    # pair i is (x[i], x[i + D/2]) rotated by angle m * theta^(-2i/D): a complex multiplication
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double())
    angle = (torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)).double()
    zr = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(rot, torch.cat((zr.real, zr.imag), -1).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rot.norm(dim=-1), x.norm(dim=-1))
    # q_m . k_n depends only on m - n: the same q and k at positions (m, n) and (m + s, n + s)
    q, k = torch.randn(D), torch.randn(D)
    qs = apply_rotary(q.expand(1, 1, T, D), cos, sin)[0, 0]
    ks = apply_rotary(k.expand(1, 1, T, D), cos, sin)[0, 0]
    dots = [qs[m] @ ks[n] for m, n in [(5, 2), (9, 6), (19, 16)]]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), atol=1e-4, rtol=1e-4)


def test_rotary_of_bf16_is_computed_in_float32_and_rounded_once():
    """bf16 queries and keys come back in bf16, each element within half a bf16 step (2^-8 relative) of the
    exact rotation: products rounded one by one to bf16 would miss it where x1 cos - x2 sin cancels."""
    D, T = 64, 256
    cos, sin = rotary_tables(D, T, theta=10000.0)
    x = torch.randn(4, 4, T, D, generator=torch.Generator().manual_seed(0)).bfloat16()
    x64 = x.double()
    x1, x2 = x64.chunk(2, dim=-1)
    exact = torch.cat((x1 * cos.double() - x2 * sin.double(), x2 * cos.double() + x1 * sin.double()), dim=-1)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()


def reference_attention(attn, x, cos, sin, repeat):
    """Multi-head causal attention written plainly, k/v heads repeated `repeat` times."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    Wq, Wk, Wv = attn.c_attn.weight.split([H * D, Hkv * D, Hkv * D])
    q = (x @ Wq.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ Wk.T).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(repeat, dim=1)
    v = (x @ Wv.T).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(repeat, dim=1)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.c_proj.weight.T


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_equals_plain_multihead_with_repeated_kv(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32)
    cos, sin = model.cos[:10], model.sin[:10]
    expected = reference_attention(attn, x, cos, sin, repeat=4 // n_kv_head)
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_causal():
    model = tiny()
    x = torch.randint(0, 50, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 50
    torch.testing.assert_close(model(x)[0][:, :12], model(y)[0][:, :12])
    assert not torch.allclose(model(x)[0][:, 12:], model(y)[0][:, 12:])


def test_document_mask_isolates_documents():
    model, eot = tiny(), 0
    doc = torch.randint(1, 50, (8,))
    a = torch.cat((torch.randint(1, 50, (5,)), torch.tensor([eot]), doc))[None]
    b = torch.cat((torch.randint(1, 50, (9,)), torch.tensor([eot]), doc))[None]  # other, longer history
    la = model(a, doc_ids=doc_ids_from_eot(a, eot))[0][0, -8:]
    lb = model(b, doc_ids=doc_ids_from_eot(b, eot))[0][0, -8:]
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)  # rotary is relative: offsets do not matter
    assert not torch.allclose(model(a)[0][0, -8:], model(b)[0][0, -8:], atol=1e-3)  # unmasked: they do


def test_doc_ids_from_eot():
    idx = torch.tensor([[3, 0, 4, 5, 0, 0, 7]])
    assert doc_ids_from_eot(idx, 0).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


@pytest.mark.parametrize("new_tokens", [1, 7, 27, 60])  # block 32, prompt 5: 27+ refills the cache, 60 twice
def test_kv_cache_greedy_equals_no_cache(new_tokens):
    model = tiny()
    prompt = torch.randint(0, 50, (2, 5))
    cached = generate(model, prompt, new_tokens, temperature=0)
    plain = generate(model, prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, 5 + new_tokens)
    assert torch.equal(cached, plain)


def test_generate_crops_long_prompt_and_stops():
    model = tiny()
    prompt = torch.randint(0, 50, (1, 40))  # longer than block_size=32: only the last 32 are kept
    out = generate(model, prompt, 3, temperature=0)
    assert torch.equal(out[:, :32], prompt[:, -32:]) and out.shape == (1, 35)
    first = out[0, 32].item()
    stopped = generate(model, prompt, 10, temperature=0, stop_tokens=(first,))
    assert stopped.shape == (1, 33)


def test_left_padded_batch_generates_as_each_prompt_alone():
    """Prompts of 3 to 12 tokens, left-padded into one batch: each row's logits and greedy reply (with and
    without the cache) are the ones it gets alone, until the batch's window fills."""
    model = tiny()
    prompts = [torch.randint(1, 50, (n,)).tolist() for n in (3, 12, 7, 1)]
    width = max(map(len, prompts))
    x = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pad = torch.tensor([width - len(p) for p in prompts])
    logits = model(x, pad=pad)[0]
    for new_tokens, use_cache in ((15, True), (15, False), (27, True)):
        out = generate(model, x, new_tokens, temperature=0, pad=pad, use_cache=use_cache)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i, width - len(p):], model(torch.tensor([p]))[0][0], atol=1e-5, rtol=1e-5)
            alone = generate(model, torch.tensor([p]), new_tokens, temperature=0)[0, len(p):]
            if new_tokens + width < 32 or len(p) == width:  # past a refill, the batch's window is the widest row's
                assert out[i, width:].tolist() == alone.tolist()


def test_per_row_generators_draw_whatever_the_batch():
    logits = torch.randn(3, 20)
    generators = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    together = sample_next(logits, 1.0, generator=generators())
    for i in range(3):
        assert sample_next(logits[i:i + 1], 1.0, generator=generators()[i:i + 1]).item() == together[i].item()
    # the draws follow the distribution and never take a token outside the top-k
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = sample_next(probs.log().expand(20000, 4), 1.0, top_k=3, generator=[g] * 20000)[:, 0]
    freq = torch.bincount(draws, minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.015, rtol=0)


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is tokens 0 and 1


def test_forward_loss_and_ignore_index():
    model = tiny()
    x = torch.randint(0, 50, (2, 6))
    t = x.clone()
    t[:, :3] = -100
    logits, loss = model(x, t)
    expected = F.cross_entropy(logits[:, 3:].reshape(-1, 50), x[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert logits.shape == (2, 6, 50)


def test_tied_head_counts_once_and_flops():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    c = model.config
    per_layer = 2 * c.n_embd + c.n_embd * (c.n_head + 2 * c.n_kv_head) * 8 + c.n_embd ** 2 + 3 * c.n_embd * c.hidden_dim
    assert model.num_params() == c.vocab_size * c.n_embd + c.n_layer * per_layer + c.n_embd
    assert model.flops_per_token() == 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


def test_init_scales_residual_projections():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=8, n_head=4, n_kv_head=4, n_embd=256))
    assert abs(model.blocks[0].mlp.gate.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005
    # the scaled layers are the ones marked as writing into the residual stream, whatever their names
    marked = [m for m in model.modules() if getattr(m, "writes_residual", False)]
    assert marked == [layer for b in model.blocks for layer in (b.attn.c_proj, b.mlp.c_proj)]


def test_optimizer_decays_matrices_only():
    model = tiny()
    opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_falls_on_planted_data():
    """A repeating pattern is learnable: 150 AdamW steps must take the loss far below uniform."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    data = pattern.repeat(20)
    opt = configure_optimizer(model, 3e-3)
    for step in range(150):
        starts = torch.randint(0, len(data) - 33, (8,))
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        _, loss = model(x, y)
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.3


@pytest.mark.parametrize("kw, message", [
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_embd=36, n_head=4, n_kv_head=4), "must be even for rotary"),
    (dict(n_embd=30, n_head=4, n_kv_head=4), "multiple of n_head"),
])
def test_bad_config(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kw)


def test_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_compiled_model_equals_eager():
    """torch.compile (train.py's compile=True, config/pretrain.py's setting) gives the eager model's loss and
    gradients, with a second batch shape (the recompile with dynamic shapes)."""
    model = tiny().train()
    compiled = torch.compile(model)
    for batch in (2, 3):
        idx = torch.randint(50, (batch, 16), generator=torch.Generator().manual_seed(batch))
        losses, grads = [], []
        for m in (model, compiled):
            model.zero_grad()
            loss = m(idx, idx)[1]
            loss.backward()
            losses.append(loss.detach())
            grads.append(model.blocks[0].attn.c_attn.weight.grad.clone())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)

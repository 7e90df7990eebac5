"""Muon (optimizer='muon'): the orthogonalization, one step against a hand computation, exact resume,
and DDP equal to one process."""
import pytest
import torch

from conftest import TINY, read_metrics, run_script
from model import GPT, GPTConfig
from optim import MuonWithAdamW, configure_optimizer, orthogonalize


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_orthogonalize_pushes_singular_values_to_about_one(shape):
    """A gradient whose singular values span two decades (1 to 0.01) comes out with all of them in
    [0.68, 1.21]: the quintic's coefficients trade exact convergence for speed. Values far below a
    hundredth of the largest are only partly lifted in 5 steps."""
    g = torch.Generator().manual_seed(0)
    n = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=g))
    G = U @ torch.diag(torch.logspace(0, -2, n)) @ V.T
    X = orthogonalize(G)
    s = torch.linalg.svdvals(X)
    assert X.shape == G.shape and s.min() > 0.65 and s.max() < 1.25
    polar = U @ V.T  # the exact orthogonal factor of G, which the iteration approximates
    assert torch.nn.functional.cosine_similarity(X.flatten(), polar.flatten(), dim=0) > 0.97


def test_one_step_equals_the_formulas_by_hand():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon", muon_lr=0.02, muon_momentum=0.95)
    assert isinstance(opt, MuonWithAdamW)
    muon_params = {id(p) for p in opt.param_groups[0]["params"]}
    assert muon_params == {id(p) for p in model.blocks.parameters() if p.dim() == 2}  # not the embedding
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        W, G = before[name], grads[name]
        if id(p) in muon_params:  # first step: M = G, Nesterov direction G + mu G
            expected = W * (1 - 0.02 * 0.1) - 0.02 * max(1, W.size(0) / W.size(1)) ** 0.5 * orthogonalize(G + 0.95 * G)
        else:  # AdamW's first step: m_hat = G, v_hat = G^2, so the update is lr * G / (|G| + eps)
            wd = 0.1 if p.dim() >= 2 else 0.0
            expected = W * (1 - 1e-3 * wd) - 1e-3 * G / (G.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=name)


def muon_run(root, out, *extra, torchrun=0):
    r = run_script("train.py", *TINY, f"--data_root={root}/data", f"--out_dir={root}/{out}", "--optimizer=muon",
                   "--max_iters=6", "--eval_interval=3", *extra, torchrun=torchrun)
    assert r.returncode == 0, r.stderr
    return r


def test_muon_resumes_exactly_and_ddp_equals_one_process(tiny_data):
    muon_run(tiny_data, "straight", "--gradient_accumulation_steps=2")
    muon_run(tiny_data, "resumed", "--gradient_accumulation_steps=2", "--stop_at_iter=3")
    muon_run(tiny_data, "resumed", "--gradient_accumulation_steps=2", "--init_from=resume")
    muon_run(tiny_data, "ddp", "--gradient_accumulation_steps=2", torchrun=2)
    a, b, c = (torch.load(tiny_data / d / "ckpt.pt", weights_only=True)["model"] for d in ("straight", "resumed", "ddp"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)  # float32 sums in another order
    losses = [r["loss"] for r in read_metrics(tiny_data / "straight") if "loss" in r]
    assert losses[-1] < losses[0]
    r = run_script("train.py", *TINY, f"--data_root={tiny_data}/data", f"--out_dir={tiny_data}/straight",
                   "--init_from=resume", "--max_iters=8")
    assert r.returncode != 0 and "trained with muon" in r.stderr

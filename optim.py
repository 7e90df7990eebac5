"""
The optimizers train.py uses: AdamW (the default), or Muon for the matrices inside the blocks with AdamW
for the rest (optimizer='muon').

Muon (Keller Jordan, 2024) for a weight W (out x in) with gradient G:
    M <- mu M + G                            momentum
    U <- orthogonalize(G + mu M)             Nesterov; then every direction of the update gets the same size
    W <- W (1 - lr wd) - lr max(1, out/in)^0.5 U
The embedding, the head and the norm gains are not matrices of a linear map from one hidden space to
another, so they stay on AdamW. One learning-rate schedule drives both: each group carries lr_ratio, its
peak learning rate over learning_rate, and train.py sets lr = schedule * lr_ratio.

torch 2.13 ships torch.optim.Muon with the same formulas, but it orthogonalizes in bfloat16, which CPUs
without bf16 instructions emulate 10-100x slower than float32; this one works in float32.
"""
import torch


def configure_optimizer(model, learning_rate, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                        optimizer="adamw", muon_lr=0.02, muon_momentum=0.95):
    """AdamW with weight decay on matrices only (not on norm gains), fused on CUDA; or with
    optimizer='muon', Muon for the blocks' matrices and AdamW for the rest, stepped as one."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2} if optimizer == "muon" else set()
    adamw = torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in hidden], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ], lr=learning_rate, betas=betas, fused=device_type == "cuda")
    if optimizer == "adamw":
        return adamw
    muon = Muon([p for p in params if id(p) in hidden], lr=muon_lr, momentum=muon_momentum,
                weight_decay=weight_decay, lr_ratio=muon_lr / learning_rate)
    return MuonWithAdamW(muon, adamw)


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
    """Muon for 2-D weights (the formulas in this file's docstring). Under DDP every process holds the
    same all-reduced gradients and computes the whole update itself, so the weights stay identical."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, lr_ratio=1.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lr_ratio=lr_ratio))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p)
                m = self.state[p]["momentum"].mul_(mu).add_(p.grad)
                update = orthogonalize(p.grad + mu * m) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - lr * wd).add_(update, alpha=-lr)


class MuonWithAdamW:
    """Two optimizers stepped as one: what train.py asks of an optimizer (param_groups, step, zero_grad,
    state, state_dict, load_state_dict), with Muon's groups first."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):  # looked up each time: load_state_dict gives each optimizer new group dicts
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])

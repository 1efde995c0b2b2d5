"""GaLore (trainlab.optim.galore): projection shapes and refreshes, agreement with the plain rules,
exact resume through a safe load, the memory it saves, and that it trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainlab.config import OptimConfig
from trainlab.optim import build_optimizer
from trainlab.optim.galore import PROJ, REFRESH, GaLoreAdamW, GaLoreLion, optimizer_state_bytes
from trainlab.optim.lion import Lion

CPU = torch.device("cpu")


class Mats(nn.Module):
    """A wide and a tall matrix (projected at rank 4), one too small to project, and a bias."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Parameter(torch.randn(8, 40) / 6)   # m <= n: left projection P (8 x 4)
        self.tall = nn.Parameter(torch.randn(48, 12) / 6)  # m > n: right projection Q (12 x 4)
        self.small = nn.Parameter(torch.randn(4, 30) / 6)  # min(shape) == rank: full rank
        self.bias = nn.Parameter(torch.zeros(40))

    def forward(self, x):  # x: (batch, 12)
        h = torch.tanh(self.tall @ x.t()).t()                  # (batch, 48)
        h = torch.tanh(h[:, :8] @ self.wide + self.bias)       # (batch, 40)
        return (h[:, :4] @ self.small).pow(2).mean() + h.pow(2).mean()


def batch(step: int, n: int = 16, d: int = 12) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1000 + step))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for s in steps:
        opt.zero_grad(set_to_none=True)
        model(batch(s)).backward()
        opt.step()


def galore(kind: str, params, **kw):
    if kind == "adamw":
        return GaLoreAdamW(params, lr=1e-2, weight_decay=0.1, **kw)
    return GaLoreLion(params, lr=1e-3, weight_decay=0.1,
                      momentum_dtype=torch.bfloat16 if kind == "lion-bf16" else None, **kw)


# ---------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("kind", ["adamw", "lion"])
def test_projection_shapes_and_which_params_are_projected(kind):
    torch.manual_seed(0)
    model = Mats()
    opt = galore(kind, model.parameters(), rank=4, update_every=10, scale=0.25)
    train(model, opt, range(1))
    wide, tall, small, bias = (opt.state[p] for p in (model.wide, model.tall, model.small, model.bias))
    assert wide[PROJ].shape == (8, 4) and wide["exp_avg"].shape == (4, 40)   # P, R = P^T G
    assert tall[PROJ].shape == (12, 4) and tall["exp_avg"].shape == (48, 4)  # Q, R = G Q
    for s in (wide, tall):
        assert s[PROJ].dtype == torch.float32 and s[REFRESH] == 1
        assert torch.allclose(s[PROJ].t() @ s[PROJ], torch.eye(4), atol=1e-5)  # orthonormal columns
    for s, p in ((small, model.small), (bias, model.bias)):
        assert PROJ not in s and REFRESH not in s
        assert s["exp_avg"].shape == p.shape


def test_projection_spans_the_top_singular_vectors_of_the_gradient():
    torch.manual_seed(0)
    model = Mats()
    opt = GaLoreAdamW(model.parameters(), lr=1e-3, rank=4, update_every=10)
    model(batch(0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    u, _, vh = torch.linalg.svd(grads["wide"], full_matrices=False)
    # singular vectors are unique up to sign (the spectrum of a random gradient is simple)
    assert torch.allclose((opt.state[model.wide][PROJ].t() @ u[:, :4]).abs(), torch.eye(4), atol=1e-4)
    u, _, vh = torch.linalg.svd(grads["tall"], full_matrices=False)
    assert torch.allclose((opt.state[model.tall][PROJ].t() @ vh[:4].t()).abs(), torch.eye(4), atol=1e-4)


def test_projection_refreshes_every_update_every_steps_and_keeps_the_moments():
    torch.manual_seed(0)
    model = Mats()
    beta1 = 0.9
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, betas=(beta1, 0.999), rank=4, update_every=3)
    refreshes, projs = [], []
    for s in range(10):
        opt.zero_grad(set_to_none=True)
        model(batch(s)).backward()
        grad = model.wide.grad.clone()
        before = opt.state[model.wide].get("exp_avg", torch.zeros(4, 40)).clone()
        opt.step()
        st = opt.state[model.wide]
        refreshes.append(st[REFRESH])
        projs.append(st[PROJ].clone())
        if s == 3:  # a refresh step: the new basis projects this gradient, the moment goes on
            assert torch.allclose(st["exp_avg"], beta1 * before + (1 - beta1) * (st[PROJ].t() @ grad), atol=1e-6)
            assert before.abs().sum() > 0
    assert refreshes == [1, 1, 1, 4, 4, 4, 7, 7, 7, 10]
    for s in range(1, 10):
        changed = not torch.equal(projs[s], projs[s - 1])
        assert changed == (s % 3 == 0), s


# ---------------------------------------------------------------------------------- agreement
def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def mlp_steps(model: nn.Module, opt, steps: int) -> None:
    for s in range(steps):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(s))
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("rank", [5, 8])  # rank >= min(m, n) of every weight: no projection
def test_rank_at_least_min_dim_is_plain_adamw(rank):
    """At rank >= min(m, n) a weight is not projected (a projection would save nothing), so
    GaLore-AdamW must be AdamW exactly.  Note that a *full-rank projection* would not be: P P^T = I,
    but Adam normalises element-wise, and P (M/sqrt V)(P^T G) != (M/sqrt V)(G) because the
    element-wise square root does not commute with the rotation P.  The projected path is checked
    against AdamW in the projected coordinates instead (test below)."""
    torch.manual_seed(0)
    a = tiny_mlp()
    b = copy.deepcopy(a)
    ours = GaLoreAdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                       rank=rank, update_every=2, scale=1.0)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    mlp_steps(a, ours, 6)
    mlp_steps(b, ref, 6)
    assert not any(PROJ in s for s in ours.state.values())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_rank_at_least_min_dim_is_plain_lion():
    torch.manual_seed(0)
    a = tiny_mlp()
    b = copy.deepcopy(a)
    ours = GaLoreLion(a.parameters(), lr=1e-3, weight_decay=0.1, rank=5, scale=1.0,
                      momentum_dtype=torch.bfloat16)
    ref = Lion(b.parameters(), lr=1e-3, weight_decay=0.1, momentum_dtype=torch.bfloat16)
    mlp_steps(a, ours, 6)
    mlp_steps(b, ref, 6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # the same ops in the same order


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_projected_step_is_the_plain_rule_in_subspace_coordinates(shape, rule):
    """With a fixed projection, no weight decay and alpha = 1, GaLore on W is exactly the plain
    rule on the low-rank coordinates X of W = W0 + P X (or W0 + X Q^T), whose gradient is P^T G
    (or G Q).  Checks the projection, the inner rule and the back-projection against torch's
    AdamW and our Lion."""
    torch.manual_seed(0)
    rank, steps = 3, 6
    w0 = torch.randn(shape)
    target = torch.randn(shape)

    def loss_fn(w):
        return (torch.tanh(w) - target).pow(2).sum()

    w = nn.Parameter(w0.clone())
    if rule == "adamw":
        ours = GaLoreAdamW([w], lr=1e-2, weight_decay=0.0, rank=rank, update_every=100, scale=1.0)
    else:
        ours = GaLoreLion([w], lr=1e-2, weight_decay=0.0, rank=rank, update_every=100, scale=1.0)
    for _ in range(steps):
        ours.zero_grad(set_to_none=True)
        loss_fn(w).backward()
        ours.step()
    proj = ours.state[w][PROJ]  # fixed after step 1: update_every > steps

    left = shape[0] <= shape[1]
    x = nn.Parameter(torch.zeros((rank, shape[1]) if left else (shape[0], rank)))
    ref = (torch.optim.AdamW([x], lr=1e-2, weight_decay=0.0) if rule == "adamw"
           else Lion([x], lr=1e-2, weight_decay=0.0))
    for _ in range(steps):
        ref.zero_grad(set_to_none=True)
        loss_fn(w0 + (proj @ x if left else x @ proj.t())).backward()
        ref.step()
    expected = w0 + (proj @ x if left else x @ proj.t())
    torch.testing.assert_close(w.detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_scale_and_decoupled_weight_decay_on_a_projected_weight():
    torch.manual_seed(0)
    base = Mats()

    def first_step(scale: float, wd: float) -> torch.Tensor:
        model = copy.deepcopy(base)
        opt = GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=wd, rank=4, scale=scale)
        train(model, opt, range(1))
        return model.wide.detach()

    w0 = base.wide.detach()
    update1 = first_step(1.0, 0.0) - w0
    torch.testing.assert_close(first_step(0.25, 0.0) - w0, 0.25 * update1, rtol=1e-5, atol=1e-7)
    # decay shrinks the full weight, not just its projection: W(1 - lr wd) - lr alpha P N
    torch.testing.assert_close(first_step(1.0, 0.5), w0 * (1 - 1e-2 * 0.5) + update1, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name,momentum", [("adamw", "fp32"), ("lion", "fp32"), ("lion", "bf16")])
def test_resume_through_a_safe_load_is_bitwise_exact(tmp_path, name, momentum):
    cfg = OptimConfig(name=name, lr=1e-2 if name == "adamw" else 1e-3, weight_decay=0.1,
                      momentum_dtype=momentum, galore_rank=4, galore_update_every=4, galore_scale=0.25)
    torch.manual_seed(0)
    model = Mats()
    opt = build_optimizer(cfg, model, CPU)
    assert isinstance(opt, GaLoreAdamW if name == "adamw" else GaLoreLion)
    train(model, opt, range(6))  # refreshes at steps 1 and 5

    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = Mats()
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(cfg, resumed, CPU)
    opt2.load_state_dict(saved["optimizer"])
    dtype = torch.bfloat16 if momentum == "bf16" else torch.float32
    for p in resumed.parameters():
        assert opt2.state[p]["exp_avg"].dtype == dtype  # torch's load would make bf16 fp32
    assert optimizer_state_bytes(opt2) == optimizer_state_bytes(opt)

    train(model, opt, range(6, 12))  # crosses the refresh at step 9
    train(resumed, opt2, range(6, 12))
    assert opt.state[model.wide][REFRESH] == 9
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_build_optimizer_without_galore_is_unchanged():
    model = Mats()
    assert type(build_optimizer(OptimConfig(name="adamw"), model, CPU)) is torch.optim.AdamW
    assert type(build_optimizer(OptimConfig(name="lion"), model, CPU)) is Lion
    opt = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1, galore_rank=4), model, CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.dim() for p in no_decay["params"]] == [1]
    assert decay["rank"] == 4 and decay["update_every"] == 200 and decay["scale"] == 0.25


# ---------------------------------------------------------------------------------- memory
def state_bytes(cfg: OptimConfig, width: int = 256, depth: int = 3) -> tuple[int, int]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    opt = build_optimizer(cfg, model, CPU)
    opt.zero_grad()
    model(torch.randn(4, width)).pow(2).mean().backward()
    opt.step()
    return optimizer_state_bytes(opt), sum(p.numel() for p in model.parameters())


def test_optimizer_state_bytes():
    r, width, depth = 16, 256, 3
    lion, n_params = state_bytes(OptimConfig(name="lion"))
    lion_bf16, _ = state_bytes(OptimConfig(name="lion", momentum_dtype="bf16"))
    adamw, _ = state_bytes(OptimConfig(name="adamw"))
    g_lion, _ = state_bytes(OptimConfig(name="lion", galore_rank=r))
    g_lion_bf16, _ = state_bytes(OptimConfig(name="lion", momentum_dtype="bf16", galore_rank=r))
    g_adamw, _ = state_bytes(OptimConfig(name="adamw", galore_rank=r))

    assert lion == 4 * n_params
    assert lion_bf16 * 2 == lion
    assert adamw == 2 * lion + 4 * 2 * depth  # + torch's 0-d fp32 step tensor per parameter
    assert 1.99 < adamw / lion < 2.01
    # per weight: projection (256 x r, fp32) + momentum (r x 256); biases at full rank
    proj, low, biases = width * r * 4, r * width, depth * width
    assert g_lion == depth * (proj + 4 * low) + 4 * biases
    assert g_lion_bf16 == depth * (proj + 2 * low) + 2 * biases
    assert g_adamw == depth * (proj + 2 * 4 * low) + 2 * 4 * biases
    assert g_lion_bf16 < g_lion < lion / 4
    assert g_adamw < adamw / 4


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_galore_trains_a_regression_model(name):
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    teacher = torch.randn(32, 4) @ torch.randn(4, 16) / 4  # a low-rank map, plus noise
    y = x @ teacher + 0.01 * torch.randn(256, 16)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.01,
                      momentum_dtype="bf16" if name == "lion" else "fp32",
                      galore_rank=8, galore_update_every=25, galore_scale=0.25)
    opt = build_optimizer(cfg, model, CPU)
    losses = []
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(PROJ in opt.state[m.weight] for m in (model[0], model[2]))
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_galore_runs_on_cuda(name):
    torch.manual_seed(0)
    model = Mats().cuda()
    opt = galore(name, model.parameters(), rank=4, update_every=2)
    for s in range(3):
        opt.zero_grad(set_to_none=True)
        model(batch(s).cuda()).backward()
        opt.step()
    assert opt.state[model.wide][PROJ].device.type == "cuda"
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""GaLore (trainlab.optim.galore): projection shapes and refreshes, agreement with the plain rules,
exact resume through a safe load, the memory it saves, and that it trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import final_weights, history, trainlab
from lion_reference import flipped_share, lion_direction, lion_step, momentum_flipping_grads
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
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_rank_at_least_min_dim_is_plain_lion():
    """At full rank GaLore-Lion is Lion: bitwise our Lion (the same ops in the same order), and
    step by step the rule written out from the paper (tests/lion_reference.py), bf16 momentum."""
    torch.manual_seed(0)
    a = tiny_mlp()
    b = copy.deepcopy(a)
    lr, wd, betas, bf16 = 1e-3, 0.1, (0.9, 0.99), torch.bfloat16
    ours = GaLoreLion(a.parameters(), lr=lr, betas=betas, weight_decay=wd, rank=5, scale=1.0, momentum_dtype=bf16)
    ref = Lion(b.parameters(), lr=lr, betas=betas, weight_decay=wd, momentum_dtype=bf16)
    written = [(p.detach().clone(), torch.zeros_like(p, dtype=bf16)) for p in a.parameters()]
    for s in range(6):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(s))
        ours.zero_grad(set_to_none=True)
        a(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in a.parameters()]
        ours.step()
        written = [lion_step(w, m, g, lr, betas, wd, bf16)[:2] for (w, m), g in zip(written, grads, strict=True)]
        for p, (w, m) in zip(a.parameters(), written, strict=True):
            torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ours.state[p]["exp_avg"], m, rtol=0, atol=0)
    mlp_steps(b, ref, 6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)  # the same ops in the same order


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_projected_step_is_the_plain_rule_in_subspace_coordinates(shape, rule):
    """With a fixed projection, no weight decay and alpha = 1, GaLore on W is exactly the plain
    rule on the low-rank coordinates X of W = W0 + P X (or W0 + X Q^T), whose gradient is P^T G
    (or G Q).  Checks the projection, the inner rule and the back-projection against torch's
    AdamW and against Lion written out from the paper (tests/lion_reference.py)."""
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
    ref = torch.optim.AdamW([x], lr=1e-2, weight_decay=0.0) if rule == "adamw" else None
    momentum = torch.zeros_like(x)
    for _ in range(steps):
        loss = loss_fn(w0 + (proj @ x if left else x @ proj.t()))
        if ref is not None:
            ref.zero_grad(set_to_none=True)
            loss.backward()
            ref.step()
        else:
            (grad,) = torch.autograd.grad(loss, [x])
            stepped, momentum, _ = lion_step(x.detach(), momentum, grad, 1e-2, ours.defaults["betas"], 0.0)
            x = nn.Parameter(stepped)
    expected = w0 + (proj @ x if left else x @ proj.t())
    torch.testing.assert_close(w.detach(), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
def test_galore_lion_matches_the_written_out_rule_across_refreshes(shape, momentum_dtype):
    """Seven steps of GaLore-Lion on one weight against the paper's GaLore step written out here
    around Lion written out from its paper (tests/lion_reference.py): the projection from the
    gradient's SVD at steps 1, 4 and 7, R = P^T G (or G Q), Lion on R with the momentum kept across
    refreshes (rounded to bf16 where it is stored so), W <- W (1 - lr wd) - lr alpha P sign(c).
    The gradients make the momentum overturn the sign of R for many entries."""
    rank, every, steps, lr, wd, scale, betas = 3, 3, 7, 1e-2, 0.5, 0.25, (0.9, 0.99)
    w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    ours = GaLoreLion([w], lr=lr, betas=betas, weight_decay=wd, rank=rank, update_every=every, scale=scale,
                      momentum_dtype=momentum_dtype)
    left = shape[0] <= shape[1]
    ref_w, momentum, proj = w.detach().clone(), None, None
    flipped = []
    for t, grad in enumerate(momentum_flipping_grads(shape, steps, seed=2), start=1):
        w.grad = grad.clone()
        ours.step()
        if (t - 1) % every == 0:  # the paper's refresh, from the SVD of this step's gradient
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            proj = u[:, :rank] if left else vh[:rank].t()
        low_grad = proj.t() @ grad if left else grad @ proj
        if momentum is None:
            momentum = torch.zeros_like(low_grad, dtype=momentum_dtype or torch.float32)
        direction, momentum, c = lion_direction(momentum, low_grad, betas, momentum_dtype)
        ref_w = ref_w * (1 - lr * wd) - lr * scale * (proj @ direction if left else direction @ proj.t())
        assert c.abs().min() > 1e-4, t  # no sign of c that rounding could turn
        state = ours.state[w]
        torch.testing.assert_close(state[PROJ], proj, rtol=0, atol=0)
        torch.testing.assert_close(state["exp_avg"], momentum, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-5, atol=1e-6)
        flipped.append(flipped_share(c, low_grad))
    assert ours.state[w][REFRESH] == 7
    assert min(flipped[1:]) > 0.3, flipped  # the momentum decided many signs, across the refreshes too


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
    for (n, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert opt.state[p].keys() == opt2.state[q].keys()
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


def test_lion_galore_and_sha256_multi_mode_are_what_the_cli_run_used(tmp_path):
    """The CLI run of tests/test_sha256_experiment.py's multi-mode Lion + GaLore smoke test, with
    the evidence that each option was in use read from the checkpoint: every 2-D weight has a rank-8
    projection and a bf16 Lion momentum of the low-rank shape (the smaller view: r x n for m <= n,
    m x r otherwise), refreshed at step 6 (every 5 from step 1); the other parameters a full-size
    bf16 momentum; no second moment anywhere; and the model reads multi mode's 24 words (8 state +
    16 block words) where step mode has 10."""
    rank = 8
    out = trainlab("run", "sha256", "--preset", "smoke", "--steps", "10", "--set", "data.mode=multi",
                   "--set", "optim.name=lion", "--set", "optim.momentum_dtype=bf16",
                   "--set", f"optim.galore_rank={rank}", "--set", "optim.galore_update_every=5",
                   "--set", "model.dim=64", "--run-dir", "m", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert history(tmp_path / "m")[-1]["step"] == 10
    weights = final_weights(tmp_path / "m")
    assert weights["pos"].shape[0] == 24
    optimizer = torch.load(tmp_path / "m" / "checkpoints" / "step_00000010" / "state.pt",
                           weights_only=True)["optimizer"]
    states = list(optimizer["state"].values())
    assert len(states) == len(weights)
    # GaLore-Lion's state: its own step count, one momentum in bf16, no second moment (AdamW's)
    assert all(s.get("step") == 10 and s["exp_avg"].dtype == torch.bfloat16 and "exp_avg_sq" not in s
               for s in states), [sorted(s) for s in states]
    projected = sorted((tuple(s[PROJ].shape), tuple(s["exp_avg"].shape), s[REFRESH]) for s in states if PROJ in s)
    matrices = [tuple(w.shape) for w in weights.values() if w.dim() == 2]
    assert matrices and all(min(shape) > rank for shape in matrices)
    assert projected == sorted((((m, rank), (rank, n)) if m <= n else ((n, rank), (m, rank))) + (6,)
                               for m, n in matrices)
    full = sorted(tuple(s["exp_avg"].shape) for s in states if PROJ not in s)
    assert full == sorted(tuple(w.shape) for w in weights.values() if w.dim() != 2)
    assert all(g["rank"] == rank for g in optimizer["param_groups"])


# ---------------------------------------------------------------------------------- devices
def galore_run(name: str, device: torch.device, steps: int = 4, lr_factor: float = 1.0) -> dict:
    """Mats trained `steps` steps on `device` from the same CPU-seeded start and batches; the
    weights and projections come back on the CPU, with the device the state was kept on."""
    torch.manual_seed(0)
    model = Mats().to(device)
    # one projection (at step 1): a later refresh would read the kept moments in a basis whose
    # column signs are the SVD's arbitrary choice, which may differ between devices' libraries
    opt = galore(name, model.parameters(), rank=4, update_every=100)
    for group in opt.param_groups:
        group["lr"] *= lr_factor
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        model(batch(s).to(device)).backward()
        opt.step()
    return {"weights": {n: p.detach().cpu() for n, p in model.named_parameters()},
            "projections": {n: opt.state[p][PROJ].cpu() for n, p in model.named_parameters() if PROJ in opt.state[p]},
            "state_device": opt.state[model.wide][PROJ].device.type}


def assert_same_run(a: dict, b: dict) -> None:
    """The same training up to floating-point differences: the projections span the same
    subspaces (columns equal up to sign, which an SVD may choose either way and GaLore's update
    does not depend on), and the weights agree within a tolerance far below one step's change."""
    assert a["projections"].keys() == b["projections"].keys() == {"wide", "tall"}
    for n in a["projections"]:
        overlap = a["projections"][n].t() @ b["projections"][n]
        torch.testing.assert_close(overlap.abs(), torch.eye(4), rtol=0, atol=1e-4, msg=lambda text, n=n: f"{n}: {text}")
    assert a["weights"].keys() == b["weights"].keys()
    for n in a["weights"]:
        torch.testing.assert_close(a["weights"][n], b["weights"][n], rtol=1e-4, atol=1e-5,
                                   msg=lambda text, n=n: f"{n}: {text}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_galore_on_cuda_matches_cpu(name):
    """The same steps on the GPU (cuSOLVER's SVD, CUDA matmuls) as on the CPU, to rounding."""
    on_cuda = galore_run(name, torch.device("cuda"))
    assert on_cuda["state_device"] == "cuda"
    assert_same_run(on_cuda, galore_run(name, CPU))


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_device_comparison_tolerates_the_svd_sign_choice_and_nothing_more(name, monkeypatch):
    """The CPU twin of the CUDA test: another library's SVD may return singular vectors with
    flipped signs (U D, D V^T with D = diag(+-1) is as valid); that must pass the comparison, a
    different training (a 1 % larger learning rate) must not."""
    plain = galore_run(name, CPU)
    svd = torch.linalg.svd

    def flipped_svd(a, full_matrices=True):
        u, s, vh = svd(a, full_matrices=full_matrices)
        signs = torch.tensor([-1.0, 1.0, -1.0] + [1.0] * (s.shape[-1] - 3))
        return u * signs, s, vh * signs[:, None]

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    other = galore_run(name, CPU)
    assert not torch.equal(other["projections"]["wide"], plain["projections"]["wide"])  # the flip is real
    assert_same_run(other, plain)
    with pytest.raises(AssertionError):
        assert_same_run(galore_run(name, CPU, lr_factor=1.01), plain)

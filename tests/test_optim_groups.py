"""The optimizer registry's general mechanisms: LR multipliers by parameter-name prefix
(optim.lr_factors), geoopt's RiemannianAdam as optim.name=riemannian_adam, and parts of a model frozen
and unfrozen by a callback mid-run (no change while frozen, exact resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_same_weights, final_weights, history, trainlab
from trainlab import Callback
from trainlab.config import OptimConfig, resolve
from trainlab.engine.trainer import Trainer
from trainlab.errors import ConfigError
from trainlab.nn.hyperbolic import load_geoopt
from trainlab.experiments.modadd import ModAdd
from trainlab.optim import OPTIMIZERS, build_optimizer, param_groups

CPU = torch.device("cpu")
geoopt = load_geoopt()


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_a = nn.Linear(3, 4)
        self.encoder_b = nn.Linear(3, 4)
        self.encoder_b_head = nn.Linear(4, 2)


def _by_name(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_factor"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_lr_factors_split_groups_by_the_longest_matching_prefix():
    model = Two()
    groups = param_groups(model, 0.1, lr_factors={"encoder_b": 0.1, "encoder_b_head.": 0.5})
    seen = _by_name(model, groups)
    assert seen["encoder_a.weight"] == (1.0, 0.1) and seen["encoder_a.bias"] == (1.0, 0.0)
    assert seen["encoder_b.weight"] == (0.1, 0.1) and seen["encoder_b.bias"] == (0.1, 0.0)
    assert seen["encoder_b_head.weight"] == (0.5, 0.1)  # the longer prefix wins over "encoder_b"
    assert len(seen) == 6
    # without factors: the two groups as before (decayed first), so saved optimizer states still load
    plain = param_groups(model, 0.1)
    assert [g["decays"] for g in plain] == [True, False] and all(g["lr_factor"] == 1.0 for g in plain)


def test_a_prefix_that_matches_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"optim.lr_factors.encoder_c.*matches no trainable parameter"):
        param_groups(Two(), 0.0, lr_factors={"encoder_c.": 0.1})


def test_the_scheduled_lr_is_multiplied_per_group(tmp_path: Path):
    cfg = resolve(ModAdd(), "smoke", None, [("train.steps", "6"), ("log.progress", "off"),
                                            ("optim.lr_factors", "{head.: 0.25}")])
    trainer = Trainer(cfg, ModAdd(), tmp_path / "r", CPU)
    trainer.fit()
    lrs = {g["lr_factor"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert set(lrs) == {1.0, 0.25}
    assert lrs[0.25] == pytest.approx(0.25 * lrs[1.0]) and lrs[1.0] > 0


def test_a_misspelt_prefix_stops_the_run_before_it_writes_anything(tmp_path: Path):
    proc = trainlab("run", "modadd", "--preset", "smoke", "--run-dir", str(tmp_path / "r"),
                    "--set", "optim.lr_factors={haed.: 0.1}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lr_factors.haed." in lines[0] and "head" in lines[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad, why", [("{head.: 0}", "> 0"), ("{head.: .inf}", "finite"),
                                      ("{'': 0.5}", "non-empty")])
def test_bad_lr_factors_are_config_errors(tmp_path: Path, bad: str, why: str):
    proc = trainlab("run", "modadd", "--preset", "smoke", "--run-dir", str(tmp_path / "r"),
                    "--set", f"optim.lr_factors={bad}", cwd=tmp_path)
    assert proc.returncode == 2 and why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_riemannian_adam_is_in_the_registry_and_is_adam_on_euclidean_parameters():
    assert "riemannian_adam" in OPTIMIZERS
    torch.manual_seed(0)
    model = Two()
    twin = Two()
    twin.load_state_dict(model.state_dict())
    cfg = OptimConfig(name="riemannian_adam", lr=1e-2)
    ours = build_optimizer(cfg, model, CPU)
    assert isinstance(ours, geoopt.optim.RiemannianAdam)
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for step in range(5):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, ours), (twin, adam)):
            opt.zero_grad()
            net.encoder_b_head(net.encoder_a(x) * net.encoder_b(x)).pow(2).mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_riemannian_adam_keeps_a_manifold_parameter_on_its_manifold():
    ball = geoopt.PoincareBall()
    holder = nn.Module()
    holder.point = geoopt.ManifoldParameter(ball.expmap0(torch.full((5, 3), 0.5)), manifold=ball)
    opt = build_optimizer(OptimConfig(name="riemannian_adam", lr=0.5), holder, CPU)
    target = torch.tensor([0.9, 0.0, 0.0])
    for _ in range(20):
        opt.zero_grad()
        ball.dist(holder.point, target).pow(2).sum().backward()
        opt.step()
    assert holder.point.norm(dim=-1).max() < 1.0  # a plain Adam step of lr 0.5 would leave the ball
    assert ball.dist(holder.point, target).max() < ball.dist(ball.expmap0(torch.full((3,), 0.5)), target)


def test_galore_with_riemannian_adam_is_refused(tmp_path: Path):
    proc = trainlab("run", "modadd", "--preset", "smoke", "--run-dir", str(tmp_path / "r"),
                    "--set", "optim.name=riemannian_adam", "--set", "optim.galore_rank=4", cwd=tmp_path)
    assert proc.returncode == 2 and "optim.galore_rank" in proc.stderr


class _FreezeHead(Callback):
    """Freezes the output head after step 3 and unfreezes it after step 7 (a stand-in for a controller)."""

    def __init__(self):
        self.frozen = False
        self.snapshots: dict[int, torch.Tensor] = {}

    def on_after_update(self, trainer):
        step = trainer.step + 1  # trainer.step is the index of the step just taken
        self.snapshots[step] = trainer.model.head.weight.detach().clone()
        if step in (3, 7):
            self.frozen = step == 3
            trainer.model.head.requires_grad_(not self.frozen)

    def state_dict(self):
        return {"frozen": self.frozen}

    def load_state_dict(self, state):
        self.frozen = state["frozen"]

    def on_resume(self, trainer, rows, kind):
        trainer.model.head.requires_grad_(not self.frozen)


def _freeze_cfg():
    return resolve(ModAdd(), "smoke", None, [("train.steps", "10"), ("log.every", "1"), ("eval.every", "0"),
                                             ("ckpt.every", "5"), ("log.progress", "off"), ("eval.at_end", "false"),
                                             ("optim.weight_decay", "0.5")])


def test_a_frozen_part_does_not_move_and_trains_again_when_unfrozen(tmp_path: Path):
    cb = _FreezeHead()
    Trainer(_freeze_cfg(), ModAdd(), tmp_path / "r", CPU, callbacks=[cb]).fit()
    snap = cb.snapshots
    # frozen after step 3: steps 4..7 leave it as it was, weight decay and Adam's moments included
    for step in (4, 5, 6, 7):
        assert torch.equal(snap[step], snap[3]), step
    assert not torch.equal(snap[2], snap[3]) and not torch.equal(snap[8], snap[7])


def test_a_resume_with_a_frozen_part_is_exact(tmp_path: Path):
    Trainer(_freeze_cfg(), ModAdd(), tmp_path / "whole", CPU, callbacks=[_FreezeHead()]).fit()
    # stopped at step 5 (the head frozen, its checkpoint saying so), then resumed in a new Trainer
    Trainer(_freeze_cfg(), ModAdd(), tmp_path / "split", CPU, callbacks=[_FreezeHead()], stop_at=5).fit()
    Trainer(_freeze_cfg(), ModAdd(), tmp_path / "split", CPU, callbacks=[_FreezeHead()]).fit()
    assert history(tmp_path / "whole") == history(tmp_path / "split")
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "split"))


def test_riemannian_adam_resumes_with_the_step_it_counted():
    """torch's load_state_dict makes "step" a float32 tensor; geoopt's bias correction beta ** step
    would then run in float32 and a resumed run drift from the uninterrupted one."""
    def run(steps: range, opt_state=None, weights=None):
        torch.manual_seed(0)
        model = Two()
        if weights is not None:
            model.load_state_dict(weights)
        opt = build_optimizer(OptimConfig(name="riemannian_adam", lr=1e-2), model, CPU)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
            assert all(type(s["step"]) is int for s in opt.state.values())
        for step in steps:
            x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model.encoder_b_head(model.encoder_a(x) * model.encoder_b(x)).pow(2).mean().backward()
            opt.step()
        return model, opt

    whole, _ = run(range(6))
    half, opt = run(range(3))
    resumed, _ = run(range(3, 6), opt.state_dict(), half.state_dict())
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_lr_factors_cannot_change_on_resume(tmp_path: Path):
    """They set the parameter groups; the saved optimizer state has the old groups' layout."""
    run = str(tmp_path / "r")
    trainlab("run", "modadd", "--preset", "smoke", "--run-dir", run, "--steps", "20", cwd=tmp_path, check=True)
    before = (tmp_path / "r" / "metrics.csv").read_text()
    proc = trainlab("run", "modadd", "--preset", "smoke", "--run-dir", run, "--steps", "40",
                    "--set", "optim.lr_factors={head.: 0.5}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "optim.lr_factors" in lines[0], proc.stderr
    assert (tmp_path / "r" / "metrics.csv").read_text() == before  # nothing written

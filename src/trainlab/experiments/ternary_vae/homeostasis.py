"""The homeostasis controller: freezes and unfreezes encoder A, encoder B and the decoder from what
each evaluation measured -- a callback the ternary VAE experiment owns, not engine code.

Rules, checked in this order at every periodic and final evaluation (model.homeostasis_* knobs):

1. coverage >= the freeze level: encoder A and the decoder are frozen (their job is done, and the
   structure losses on B no longer pull them around); coverage below the unfreeze level unfreezes
   them (hysteresis: the two levels differ, so noise at one level does not toggle them);
2. encoder B frozen for `b_rest_evals` evaluations: unfrozen, to try again;
3. otherwise, the hierarchy changed by less than `plateau_delta` over the last `plateau_evals`
   evaluations: encoder B is frozen (it has stopped improving; resting it lets A, the decoder and the
   curvature settle around it);
4. Q above its best by `min_q_gain`: a new best; while encoder A is frozen, the coverage freeze level
   then relaxes by `relax_step` (never below the unfreeze level): a model that structures better may
   trade a little coverage.  The threshold relaxes only on an improvement of Q.

A part is never frozen when nothing else would train (the loss would have no gradient at all).

Freezing is `requires_grad_(False)` on the part's parameters: no gradient reaches them, and the
optimizers trainlab builds skip a parameter without a gradient, so neither Adam's moments nor weight
decay move it; unfreezing lets it train on from the moments it had.  Every decision is an event
(kind "homeostasis") with the numbers that caused it; the frozen parts, the history and the relaxed
level ride in every checkpoint, so a resume continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math

import torch

from trainlab.engine.callbacks import Callback, Evaluation
from trainlab.experiments.ternary_vae.model import PARTS

EVENT = "homeostasis"


class HomeostasisController(Callback):
    key = "ternary_vae.homeostasis"
    all_ranks = True  # it freezes parts of the model: every rank must freeze the same, at the same step

    def __init__(self, coverage_freeze: float, coverage_unfreeze: float, plateau_evals: int, plateau_delta: float,
                 b_rest_evals: int, relax_step: float, min_q_gain: float):
        self.coverage_unfreeze = coverage_unfreeze
        self.plateau_evals = plateau_evals
        self.plateau_delta = plateau_delta
        self.b_rest_evals = b_rest_evals
        self.relax_step = relax_step
        self.min_q_gain = min_q_gain
        # the state a checkpoint keeps
        self.coverage_freeze = coverage_freeze
        self.frozen: dict[str, bool] = {part: False for part in PARTS}
        self.hierarchy_history: list[float] = []  # since encoder B last changed state
        self.b_rested = 0  # evaluations encoder B has been frozen
        self.best_q: float | None = None

    @classmethod
    def from_config(cls, model_cfg) -> "HomeostasisController":
        return cls(model_cfg.homeostasis_coverage_freeze, model_cfg.homeostasis_coverage_unfreeze,
                   model_cfg.homeostasis_plateau_evals, model_cfg.homeostasis_plateau_delta,
                   model_cfg.homeostasis_b_rest_evals, model_cfg.homeostasis_relax_step,
                   model_cfg.homeostasis_min_q_gain)

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict:
        return {"coverage_freeze": self.coverage_freeze, "frozen": dict(self.frozen),
                "hierarchy_history": list(self.hierarchy_history), "b_rested": self.b_rested,
                "best_q": self.best_q}

    def load_state_dict(self, state: dict) -> None:
        self.coverage_freeze = float(state["coverage_freeze"])
        self.frozen = {part: bool(state["frozen"].get(part, False)) for part in PARTS}
        self.hierarchy_history = [float(h) for h in state["hierarchy_history"]]
        self.b_rested = int(state["b_rested"])
        self.best_q = None if state["best_q"] is None else float(state["best_q"])

    def on_resume(self, trainer, rows, kind) -> None:
        # the weights were loaded with every part trainable; the saved state says which are frozen
        self._apply(trainer.model)

    # ------------------------------------------------------------------ decisions
    def on_evaluate(self, trainer, evaluation: Evaluation) -> None:
        if evaluation.kind not in ("periodic", "final"):
            return
        measured = {name: float(evaluation.metrics[name]) for name in ("coverage", "hierarchy", "Q")
                    if name in evaluation.metrics}
        if len(measured) < 3 or not all(math.isfinite(v) for v in measured.values()):
            return  # nothing to decide on (a non-finite evaluation is the non-finite policy's to handle)
        for decision in self.decide(measured, trainer.model):
            trainer.events.write({"kind": EVENT, "step": evaluation.step, **decision, **measured})

    def decide(self, measured: dict[str, float], model: torch.nn.Module) -> list[dict]:
        """The decisions one evaluation's coverage, hierarchy and Q lead to, applied to `model`."""
        coverage, hierarchy, q = measured["coverage"], measured["hierarchy"], measured["Q"]
        a_resting = self.frozen["encoder_a"]  # before this evaluation's decisions (rule 4 reads it)
        out: list[dict] = []

        def change(parts: list[str], frozen: bool, reason: str) -> None:
            parts = [p for p in parts if self.frozen[p] != frozen]
            if frozen and parts and not _trains_outside(model, parts):
                out.append({"action": "kept", "parts": parts, "reason": reason + "; not frozen: nothing else would train"})
                return
            if parts:
                for part in parts:
                    self.frozen[part] = frozen
                out.append({"action": "freeze" if frozen else "unfreeze", "parts": parts, "reason": reason})

        if coverage >= self.coverage_freeze and not (self.frozen["encoder_a"] and self.frozen["decoder"]):
            change(["encoder_a", "decoder"], True,
                   f"coverage {coverage:.4f} >= {self.coverage_freeze:.4f} (freeze level)")
        elif coverage < self.coverage_unfreeze and (self.frozen["encoder_a"] or self.frozen["decoder"]):
            change(["encoder_a", "decoder"], False,
                   f"coverage {coverage:.4f} < {self.coverage_unfreeze:.4f} (unfreeze level)")

        if self.frozen["encoder_b"]:
            self.b_rested += 1
            if self.b_rested >= self.b_rest_evals:
                change(["encoder_b"], False, f"rested {self.b_rested} evaluations; trying again")
                self.b_rested, self.hierarchy_history = 0, []
        else:
            self.hierarchy_history = (self.hierarchy_history + [hierarchy])[-self.plateau_evals:]
            if len(self.hierarchy_history) == self.plateau_evals:
                spread = max(self.hierarchy_history) - min(self.hierarchy_history)
                if spread < self.plateau_delta:
                    change(["encoder_b"], True,
                           f"hierarchy plateaued: it moved {spread:.5f} < {self.plateau_delta:g} over the last "
                           f"{self.plateau_evals} evaluations (now {hierarchy:.4f})")
                    # frozen, or kept trainable: a new plateau of plateau_evals values is needed either
                    # way (a kept part is not re-reported at every evaluation)
                    self.b_rested, self.hierarchy_history = 0, []

        if self.best_q is None or q > self.best_q + self.min_q_gain:
            improved = self.best_q is not None
            self.best_q = q
            relaxed = max(self.coverage_unfreeze, self.coverage_freeze - self.relax_step)
            # only while encoder A rests (since an earlier evaluation): before, Q rises at every
            # evaluation of a young run
            if improved and a_resting and relaxed < self.coverage_freeze:
                out.append({"action": "relax", "parts": [],
                            "reason": f"Q {q:.4f} is a new best: the coverage freeze level relaxes "
                                      f"{self.coverage_freeze:.4f} -> {relaxed:.4f}",
                            "coverage_freeze": relaxed})
                self.coverage_freeze = relaxed
        self._apply(model)
        return out

    def _apply(self, model: torch.nn.Module) -> None:
        for part in PARTS:
            model.part(part).requires_grad_(not self.frozen[part])


def _trains_outside(model: torch.nn.Module, parts: list[str]) -> bool:
    """Whether a trainable parameter would be left with `parts` frozen (the curvature, a controller)."""
    inside = {id(p) for part in parts for p in model.part(part).parameters()}
    return any(p.requires_grad and id(p) not in inside for p in model.parameters())

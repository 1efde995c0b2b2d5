"""The memory ablation's sweep rules: does the decaying memory help beyond the attention window, by how
much, and with what uncertainty -- or can this sweep not tell?

Every memory-on point is compared with the memory-off point that differs from it only in the memory's
own knobs (model.memory, model.lambda_min, model.decay_init: a network without memory ignores the last
two, so the off points of a lambda_min x decay_init grid are one network and the first finished one is
the reference); with train.seed in the grid, on and off are paired seed by seed.  Only points whose run
finished at its planned last step are judged, at their final evaluation.

Recall (the final evaluation's `recall` array, recall.py): per distance, trials pooled over seeds.
  positive control  the shortest distance inside the window (0.5 window): the memory-on model must recall
                    there -- Wilson lower end of its exact-match rate above CONTROL_LEVEL -- or the test
                    cannot blame the memory for anything further out;
  beyond the window distances of 2 windows and more; the difference on - off of the exact-match rates with
                    Newcombe's hybrid-score 95 % interval (from the two Wilson intervals).  The probes of
                    both arms are the same texts (data.recall_seed), so the two rates are positively
                    correlated and this unpaired interval is, if anything, too wide.
  rules  1  some distance beyond the window: difference interval above 0   -> the memory helps there
         2  some distance beyond: interval below 0, none above             -> the memory hurts recall there
         3  every distance beyond: interval within +-RESOLUTION            -> no help this test can see
         4  the positive control fails                                     -> this sweep cannot tell
         5  otherwise (intervals too wide)                                 -> cannot tell: more trials
Held-out bits per byte: final val_bpb on - off.  With two or more seeds, the mean difference and its
t interval over seeds; with one seed, the paired t interval over the evaluation sequences
(val_bpb_by_sequence) -- which measures the text sampled, not seed-to-seed variation, and says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from trainlab.engine.logs import ARRAYS_FILE, read_events
from trainlab.experiments.memory_lm.recall import KEY_END, QUERY, wilson_interval
from trainlab.health.stats import mean_t_interval
from trainlab.sweep.report import Conclusion, PointResult, SweepFindings, is_complete, left_out_text

MEMORY_KNOBS = ("model.memory", "model.lambda_min", "model.decay_init")
SEED_KEY = "train.seed"
CONTROL_LEVEL = 0.10  # the positive control passes when exact recall inside the window is surely above 10 %
RESOLUTION = 0.10  # "no help" needs the whole difference interval within +-10 percentage points
BEYOND = 2.0  # distances from two windows on are beyond the window (one window is its edge)
TEMPLATE_BYTES = len(KEY_END) + len(QUERY)  # what the shortest probe holds besides the key


@dataclass
class Recall:
    exact: int
    trials: int
    distance: int

    @property
    def rate(self) -> float:
        return self.exact / self.trials if self.trials else float("nan")


@dataclass
class Arm:
    point: PointResult
    memory: bool
    val_bpb: float | None
    bpb_by_sequence: list[float]
    recall: dict[float, Recall] = field(default_factory=dict)  # window multiple -> result
    horizons: tuple[float, float] | None = None  # smallest and largest 1 / (1 - lambda) in bytes
    receptive_field: int | None = None  # bytes the stacked window attention reaches back
    window: int = 0  # model.window (0: full attention)


def _last_arrays(run_dir: Path) -> dict[str, dict]:
    """The last record of each array in eval_arrays.jsonl (periodic and final evaluations only: a curriculum
    phase's end is tagged), read once."""
    return {r["name"]: r for r in read_events(run_dir / ARRAYS_FILE) if r.get("name") and not r.get("tag")}


def read_arm(p: PointResult) -> Arm | None:
    """The final numbers of one finished point, or None when it has no config trainlab can read."""
    cfg = getattr(p.run, "cfg", None)
    if cfg is None:
        return None
    rows = p.run.rows
    bpb = [r["val_bpb"] for r in rows if isinstance(r.get("val_bpb"), (int, float))]
    lo = [r["memory_horizon_min"] for r in rows if isinstance(r.get("memory_horizon_min"), (int, float))]
    hi = [r["memory_horizon_max"] for r in rows if isinstance(r.get("memory_horizon_max"), (int, float))]
    arrays = _last_arrays(p.run_dir)
    per_sequence = arrays.get("val_bpb_by_sequence")
    arm = Arm(p, bool(cfg.model.memory), bpb[-1] if bpb else None,
              list(per_sequence["values"]) if per_sequence else [],
              horizons=(lo[-1], hi[-1]) if lo and hi else None,
              receptive_field=cfg.model.layers * (cfg.model.window - 1) if cfg.model.window else None,
              window=cfg.model.window)
    table = arrays.get("recall")
    if table:
        width = table["shape"][1]
        values = table["values"]
        for i in range(table["shape"][0]):
            multiple, distance, trials, exact_rate = values[i * width: i * width + 4]
            arm.recall[multiple] = Recall(round(exact_rate * trials), int(trials), int(distance))
    return arm


def newcombe_difference(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """p1 - p2 of two independent proportions and Newcombe's hybrid-score 95 % interval (method 10 of
    Newcombe 1998), built from the two Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def _label(values: dict, leave_out: tuple[str, ...]) -> str:
    kept = {k: v for k, v in values.items() if k not in leave_out}
    return ", ".join(f"{k}={v}" for k, v in kept.items()) or "all points"


def _pairing_key(p: PointResult) -> tuple:
    return tuple(sorted((k, v) for k, v in p.values.items() if k not in MEMORY_KNOBS))


def _pool(arms: list[Arm], multiple: float) -> Recall | None:
    found = [a.recall[multiple] for a in arms if multiple in a.recall]
    if len(found) < len(arms) or not found:
        return None
    return Recall(sum(r.exact for r in found), sum(r.trials for r in found), found[0].distance)


def _bpb_numbers(pairs: list[tuple[Arm, Arm]]) -> tuple[list[str], str]:
    """The numbers of the bits-per-byte comparison, and the clause the verdict ends with."""
    diffs = [on.val_bpb - off.val_bpb for on, off in pairs if on.val_bpb is not None and off.val_bpb is not None]
    if not diffs:
        return ["held-out bits per byte: not measured (no val_bpb in these runs)"], "held-out bits per byte not measured"
    on_mean = statistics.fmean(on.val_bpb for on, _ in pairs)
    off_mean = statistics.fmean(off.val_bpb for _, off in pairs)
    head = f"held-out bits per byte: memory on {on_mean:.4f}, off {off_mean:.4f}"
    across = mean_t_interval(diffs)
    on, off = pairs[0]
    if across:
        m, lo, hi = across
        basis = f"over {len(diffs)} seeds"
        line = f"{head}; difference {m:+.4f} bits/byte, 95 % t interval {basis} [{lo:+.4f}, {hi:+.4f}]"
    elif len(on.bpb_by_sequence) == len(off.bpb_by_sequence) >= 2:
        _, lo, hi = mean_t_interval([a - b for a, b in zip(on.bpb_by_sequence, off.bpb_by_sequence)])
        m, basis = diffs[0], "over the evaluation text only, one seed"
        line = (f"{head}; difference {m:+.4f} bits/byte, paired 95 % t interval over the "
                f"{len(on.bpb_by_sequence)} evaluation sequences [{lo:+.4f}, {hi:+.4f}] -- the text's sampling "
                "noise only: one seed per arm, so seed-to-seed variation is not measured (add --grid train.seed=0,1,2)")
    else:
        return ([f"{head}; difference {diffs[0]:+.4f} bits/byte, no interval (one seed, no per-sequence values)"],
                f"held-out bits per byte {diffs[0]:+.4f} with memory, no interval")
    shown = f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}] bits/byte, {basis}"
    clause = ("the memory lowers held-out bits per byte" if hi < 0 else
              "the memory raises held-out bits per byte (worse)" if lo > 0 else
              "held-out bits per byte: no difference the interval can see")
    return [line], f"{clause}: {shown}"


def _conclusion(label: str, bpb: str, rule: str, verdict: str, numbers: list[str]) -> Conclusion:
    """The recall verdict, then what the memory does to held-out bits per byte."""
    return Conclusion(label, rule, f"{verdict}; {bpb}", numbers)


def _compare(label: str, pairs: list[tuple[Arm, Arm]]) -> Conclusion:
    ons, offs = [on for on, _ in pairs], [off for _, off in pairs]
    multiples = sorted(set.intersection(*(set(a.recall) for a in ons + offs))) if ons else []
    numbers, bpb = _bpb_numbers(pairs)
    seeds = f" over {len(pairs)} seeds" if len(pairs) > 1 else ""
    reach = ons[0].receptive_field
    if reach:
        numbers.append(f"the stacked window attention alone reaches {reach} bytes back (layers x (window - 1)): "
                       "the memory-off arm shows what that buys")
    if not multiples:
        return _conclusion(label, bpb, "5", "cannot tell: no recall test in these runs (data.recall_multiples is empty)",
                          numbers)
    inside = [m for m in multiples if m < 1]
    control = _pool(ons, inside[0]) if inside else None
    control_ok = False
    window = ons[0].window
    if control is not None and window and control.distance >= window:
        # the shortest probe (key + template) is longer than half a small window: no longer inside it
        numbers.append(f"positive control: not measured -- the {inside[0]:g}-window probe is {control.distance} "
                       f"bytes, not inside the {window}-byte window (a probe needs the key and {TEMPLATE_BYTES} bytes "
                       "of template)")
        control = None
    elif control is None:
        numbers.append("positive control: not measured -- no distance inside the window was tested "
                       "(data.recall_multiples needs 0.5)")
    if control is not None:
        lo, hi = wilson_interval(control.exact, control.trials)
        control_ok = lo > CONTROL_LEVEL
        numbers.append(f"positive control ({inside[0]:g} window, {control.distance} bytes, inside the window): memory on "
                       f"recalls {control.exact}/{control.trials} = {_pct(control.rate)} [{_pct(lo)}, {_pct(hi)}]"
                       f"{seeds} -> {'passes' if control_ok else 'fails'} (needs the lower end above "
                       f"{_pct(CONTROL_LEVEL)})")
    beyond = []
    for m in multiples:
        on, off = _pool(ons, m), _pool(offs, m)
        if on is None or off is None:
            continue
        d, lo, hi = newcombe_difference(on.exact, on.trials, off.exact, off.trials)
        numbers.append(f"{m:g} window ({on.distance} bytes): on {on.exact}/{on.trials} = {_pct(on.rate)}, off "
                       f"{off.exact}/{off.trials} = {_pct(off.rate)}, difference {_pp(d)} [{_pp(lo)}, {_pp(hi)}]")
        if m >= BEYOND:
            beyond.append((m, d, lo, hi))
    if control is None or not control_ok:
        why = "no probe inside the window was tested" if control is None else \
            "the memory-on model does not recall a key even inside its window"
        return _conclusion(label, bpb, "4", f"this sweep cannot tell whether the memory helps: {why} (the positive "
                                      "control), so a failure further out says nothing about the memory", numbers)
    if not beyond:
        return _conclusion(label, bpb, "5", "cannot tell: no distance of two windows or more was tested", numbers)
    helps = [b for b in beyond if b[2] > 0]
    hurts = [b for b in beyond if b[3] < 0]
    if helps:
        m, d, lo, hi = max(helps, key=lambda b: b[1])
        where = ", ".join(f"{b[0]:g}" for b in helps)
        return _conclusion(label, bpb, "1", f"the memory helps beyond the window: at {where} window(s) its exact recall is "
                                      f"significantly above memory off; most at {m:g} windows, {_pp(d)} "
                                      f"(95 % [{_pp(lo)}, {_pp(hi)}])", numbers)
    if hurts:
        m, d, lo, hi = min(hurts, key=lambda b: b[1])
        return _conclusion(label, bpb, "2", f"the memory hurts recall beyond the window: at {m:g} windows {_pp(d)} "
                                      f"(95 % [{_pp(lo)}, {_pp(hi)}]) against memory off", numbers)
    if all(-RESOLUTION <= lo and hi <= RESOLUTION for _, _, lo, hi in beyond):
        widest = max(hi for _, _, _, hi in beyond)
        return _conclusion(label, bpb, "3", f"no help beyond the window that this test can see: every difference "
                                      f"interval at two windows and more lies within +-{100 * RESOLUTION:.0f} pp "
                                      f"(at most {_pp(widest)})", numbers)
    return _conclusion(label, bpb, "5", "cannot tell: the difference intervals beyond the window are wider than "
                                  f"+-{100 * RESOLUTION:.0f} pp and include 0; more probes (data.recall_trials) "
                                  "or seeds would tell", numbers)


def _cell(arm: Arm | None, multiple: float) -> str:
    if arm is None or multiple not in arm.recall:
        return "-"
    r = arm.recall[multiple]
    lo, hi = wilson_interval(r.exact, r.trials)
    return f"{r.exact}/{r.trials} = {_pct(r.rate)} [{_pct(lo)}, {_pct(hi)}]"


def sweep_findings(points: list[PointResult]) -> SweepFindings:
    arms = {p.name: read_arm(p) for p in points if is_complete(p)}
    left_out = [left_out_text(p) for p in points if not is_complete(p)]
    unreadable = [name for name, arm in arms.items() if arm is None]
    left_out += [f"{name}: its config cannot be read" for name in unreadable]
    judged = [a for a in arms.values() if a is not None]
    left_line = [f"left out, their last values are not final: {'; '.join(left_out)}"] if left_out else []

    offs: dict[tuple, Arm] = {}
    for arm in judged:
        if not arm.memory:
            offs.setdefault(_pairing_key(arm.point), arm)
    groups: dict[str, list[tuple[Arm, Arm]]] = {}
    unpaired = []
    for arm in judged:
        if not arm.memory:
            continue
        off = offs.get(_pairing_key(arm.point))
        if off is None:
            unpaired.append(arm.point.name)
            continue
        groups.setdefault(_label(arm.point.values, ("model.memory", SEED_KEY)), []).append((arm, off))
    conclusions = [_compare(label, pairs) for label, pairs in groups.items()]
    for c in conclusions:
        c.numbers += left_line
        c.left_out = left_out
    if not conclusions:
        why = ("no finished memory-off point to compare with" if any(a.memory for a in judged)
               else "no finished memory-on point" if judged else "no point finished")
        extra = f" (memory-on points without a partner: {', '.join(unpaired)})" if unpaired else ""
        conclusions = [Conclusion("all points", "-", f"no conclusion about the memory: {why}{extra}; run the ablation "
                                                     "with --grid model.memory=on,off", left_line, left_out=left_out)]

    multiples = sorted({m for a in judged for m in a.recall})
    headers = (["point", "memory", "state", "val_bpb", "memory horizon 1/(1-lambda), bytes"] +
               [f"recall {m:g} window" for m in multiples])
    rows = []
    for p in points:
        arm = arms.get(p.name)
        state = f"{p.state} at {p.step}/{p.total_steps}" if p.step is not None else p.state
        if arm is None:
            rows.append([p.name, "-", state, "-", "-"] + ["-"] * len(multiples))
            continue
        lam = f"{arm.horizons[0]:,.0f} .. {arm.horizons[1]:,.0f}" if arm.horizons else "-"
        bpb = f"{arm.val_bpb:.4f}" if arm.val_bpb is not None else "-"
        rows.append([p.name, "on" if arm.memory else "off", state, bpb, lam] + [_cell(arm, m) for m in multiples])
    title = "held-out bits per byte and exact recall by distance (k/n = rate [95 % Wilson interval])"
    return SweepFindings(conclusions, [(title, headers, rows)])

"""`trainlab preflight` (health/preflight.py): its refusals, each branch of its claims, and the
verdict a stopped run gets; and the saved verdicts (health/evidence.py) that the report reads.

Three layers, cheapest first:
- the claim functions fed curves and probe readings built for one branch each (milliseconds);
- `run_preflight` in this process on the smoke preset with a fault built into the experiment (a
  parameter outside the graph, a data stream that is not a pure function of the step, a frozen LR,
  a health stop policy): a second or two each;
- the CLI where the user sees the result (exit code, the one-line refusal, the verdict line):
  `trainlab.cli.main` in this process, and two cases as real `python -m trainlab` subprocesses,
  started together, two at a time, the first time a test needs one.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import trainlab
from trainlab.cli import main as cli_main
from trainlab.config import MemoryConfig
from trainlab.engine.logs import read_metrics
from trainlab.experiments.modadd import ModAdd
from trainlab.health import stats
from trainlab.health.evidence import claims_for
from trainlab.health.preflight import (RATIO_BAND, _dead_layer_claim, _host_memory_claim, _learning_claim,
                                       _run_claim, _update_ratio_claim, run_preflight)
from trainlab.launch import load_target

BASELINE = math.log(23)  # the smoke preset's modulus: a uniform guess over 23 residues


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The in-process runs get one intra-op thread, as conftest gives the CLI subprocesses
    (OMP_NUM_THREADS=1): on the smoke model a second thread only spins (measured 0.55 vs 2.3
    CPU-seconds per 20-step preflight)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# The learning claim, one curve per branch
# --------------------------------------------------------------------------------------------

def _rows(body: list[float]) -> list[dict]:
    """Metrics rows: a steep warm-up (a quarter of the body's length, which is the 20 % of all rows
    the claim skips) and then `body`, the part the claim judges."""
    warmup = [BASELINE + 1.0 - 0.05 * i for i in range(len(body) // 4)]
    return [{"step": 10 * (i + 1), "loss": v} for i, v in enumerate(warmup + body)]


def _palindrome(n: int, scale: float, seed: int = 0) -> list[float]:
    """Zero-mean noise that reads the same backwards: every pair of points has a mirror pair with
    the opposite sign, so its Mann-Kendall S is exactly 0 and its Sen slope exactly 0."""
    rng = random.Random(seed)
    half = [rng.gauss(0.0, 1.0) for _ in range(n // 2)]
    noise = half + half[::-1]
    mean = sum(noise) / len(noise)
    return [scale * (e - mean) for e in noise]


def _judged(rows: list[dict]) -> list[float]:
    losses = [r["loss"] for r in rows if math.isfinite(r["loss"])]
    return losses[int(len(losses) * 0.2):]


def test_learning_claim_a_falling_loss_is_learning():
    rows = _rows([BASELINE - 0.2 - 0.01 * i + n for i, n in enumerate(_palindrome(80, 0.01))])
    claim, outcome, _ = _learning_claim(rows, BASELINE)
    assert (outcome, claim.verdict) == ("learning", "pass"), claim
    assert claim.value.startswith("learning:") and "below the baseline" in claim.value


def test_learning_claim_a_rising_loss_is_diverging():
    body = [BASELINE - 0.5 + 0.01 * i + n for i, n in enumerate(_palindrome(80, 0.01))]
    claim, outcome, details = _learning_claim(_rows(body), BASELINE)
    assert (outcome, claim.verdict) == ("diverging", "fail"), claim
    assert claim.value.startswith("diverging: loss ")
    # the two numbers shown are the first and last quarters' means of the judged rows
    assert details["first_quarter_mean"] == pytest.approx(sum(body[:20]) / 20)
    assert details["last_quarter_mean"] == pytest.approx(sum(body[-20:]) / 20)


def test_learning_claim_flat_but_far_below_the_baseline_passes():
    body = [BASELINE - 1.0 + n for n in _palindrome(80, 0.01)]  # no trend at all, 1 nat under a guess
    claim, outcome, details = _learning_claim(_rows(body), BASELINE)
    assert (outcome, claim.verdict) == ("flat below baseline", "pass"), claim
    assert claim.value.startswith("flat below the baseline")
    assert details["mean"] == pytest.approx(BASELINE - 1.0, abs=0.01)


def test_learning_claim_flat_at_the_baseline_is_not_learning():
    body = [BASELINE + n for n in _palindrome(80, 0.01)]
    claim, outcome, _ = _learning_claim(_rows(body), BASELINE)
    assert (outcome, claim.verdict) == ("not learning", "fail"), claim
    assert "at the baseline" in claim.value


def test_learning_claim_a_faint_fall_in_loud_noise_is_too_noisy():
    # noise of 0.3 nats around the baseline with a fall of 1e-4 per row: the Sen slope is exactly
    # -1e-4 (the palindrome's slopes are symmetric about 0, the drift shifts them all), far too
    # small to be significant, and the level cannot be told from the baseline
    drift = 1e-4
    body = [BASELINE - drift * i + n for i, n in enumerate(_palindrome(80, 0.3))]
    rows = _rows(body)
    judged = _judged(rows)
    trend, level = stats.mann_kendall(judged), stats.mean_below(judged[len(judged) // 2:], BASELINE)
    assert trend.trend == "no trend" and trend.sen_slope == pytest.approx(-drift) and level.indistinguishable
    claim, outcome, details = _learning_claim(rows, BASELINE)
    assert (outcome, claim.verdict) == ("too noisy", "warn"), claim
    assert claim.value.startswith("too noisy to tell (about ") and "more steps would tell" in claim.value
    # the estimate is given in optimizer steps: rows are 10 steps apart here
    rows_more = stats.steps_to_resolve(trend, len(judged))
    assert details["steps_to_resolve"] == rows_more * 10


def test_learning_claim_needs_ten_rows_after_the_warmup():
    short = [{"step": i + 1, "loss": BASELINE - 0.1 * i} for i in range(11)]  # 11 - int(2.2) = 9 judged
    claim, outcome, _ = _learning_claim(short, BASELINE)
    assert (outcome, claim.verdict) == ("unknown", "not measured") and claim.value.startswith("9 ")
    enough = [{"step": i + 1, "loss": BASELINE - 0.1 * i} for i in range(12)]  # 12 - 2 = 10 judged
    assert _learning_claim(enough, BASELINE)[1] == "learning"


def test_learning_claim_leaves_non_finite_losses_out_instead_of_crashing():
    """A run that blew up logs nan and inf; the claim judges the finite rows (the numerics claim
    reports the others) instead of raising from the trend test."""
    rows = _rows([BASELINE - 0.2 - 0.01 * i + n for i, n in enumerate(_palindrome(80, 0.01))])
    rows[50]["loss"], rows[70]["loss"] = float("nan"), float("inf")
    claim, outcome, _ = _learning_claim(rows, BASELINE)
    finite = 98  # judged: the finite rows less the first 20 % of them
    assert outcome == "learning" and claim.source.endswith(f"-1000 ({finite - int(0.2 * finite)} rows)"), claim


# --------------------------------------------------------------------------------------------
# Gradients, update ratios, host memory, how the run ended: the claims from their readings
# --------------------------------------------------------------------------------------------

def test_dead_layer_claim_names_the_parameters_that_never_got_a_gradient():
    claim, problem = _dead_layer_claim({"head.weight": 5, "blocks.0.qkv.weight": 0, "tok.weight": 1}, 5)
    assert claim.verdict == "fail" and claim.value == "1 of 3: blocks.0.qkv.weight"
    assert problem == "1 parameters never receive a gradient"
    claim, problem = _dead_layer_claim({"head.weight": 5, "tok.weight": 1}, 5)
    assert (claim.verdict, claim.value, problem) == ("pass", "0 of 2", None)


def test_update_ratio_claim_judges_each_parameters_median_against_the_band():
    lo, hi = RATIO_BAND
    inside = {"edge_low": [lo] * 3, "edge_high": [hi] * 3, "typical": [1e-3, 2e-3, 1e-3],
              "one_burst": [1e-3, 1e-3, 50.0]}  # a single huge update: the median is still 1e-3
    claim, problem = _update_ratio_claim(inside)
    assert (claim.verdict, problem) == ("pass", None), claim
    claim, problem = _update_ratio_claim({**inside, "frozen": [0.0, 0.0, 1e-3], "rewritten": [0.5, 0.4, 2.0]})
    assert claim.verdict == "warn" and problem == "2 layers with update/weight ratio outside the band"
    assert "from 0 (frozen) to 0.5 (rewritten); 2 of 6 outside" in claim.value
    assert _update_ratio_claim({"all_zero_weights": []}) == (None, None)


def test_host_memory_claim_needs_ten_percent_headroom_under_the_ceiling_or_the_machine():
    ceiling = MemoryConfig(host_ceiling_gb=2.0)
    assert _host_memory_claim(1.79, ceiling, 64.0, 8).verdict == "pass"
    over = _host_memory_claim(1.8, ceiling, 64.0, 8)
    assert over.verdict == "fail" and "of 2 GB (ceiling)" in over.value
    none = MemoryConfig()
    assert _host_memory_claim(8.9, none, 10.0, 8).verdict == "pass"
    full = _host_memory_claim(9.5, none, 10.0, 8)
    assert full.verdict == "fail" and "of 10 GB (machine total)" in full.value and "headroom 5 %" in full.value


def test_run_claim_gives_a_stops_own_reason():
    message = ("memory guard: host RAM 0.300 GB (process) over memory.host_ceiling_gb=0.01 at step 10; "
               "checkpoint saved to pf/checkpoints/step_00000010")
    claim, reason = _run_claim(message, 10, 20, 300.0)
    assert claim.verdict == "fail" and claim.evidence == message
    assert reason == "run stopped at step 10: memory guard: host RAM 0.300 GB (process) over " \
                     "memory.host_ceiling_gb=0.01 at step 10"
    claim, reason = _run_claim(None, 3, 20, 0.5)
    assert (claim.verdict, reason) == ("info", None) and "3 of 20 steps" in claim.value and "0.5 s" in claim.value
    assert _run_claim(None, 20, 20, 300.0)[0].verdict == "pass"


# --------------------------------------------------------------------------------------------
# run_preflight in this process, a fault built into the experiment
# --------------------------------------------------------------------------------------------

class WithDeadParameters(nn.Module):
    """The smoke model plus one parameter outside the graph (its gradient stays None) and one in
    the graph times zero (its gradient is all zeros)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.unused = nn.Parameter(torch.ones(4))
        self.zeroed = nn.Parameter(torch.ones(4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(tokens) + 0.0 * self.zeroed.sum()


class DeadParametersModAdd(ModAdd):
    def build_model(self, cfg) -> nn.Module:
        return WithDeadParameters(super().build_model(cfg))


class CountingDataModAdd(ModAdd):
    """A data stream that counts its calls instead of reading the step: the same batches as the
    pure stream in one uninterrupted run, different ones after a reload -- the fault the resume
    check exists to catch."""

    def build_data(self, cfg, device):
        data = super().build_data(cfg, device)
        pure, calls = data.batch, itertools.count()
        data.batch = lambda step, micro, level: pure(next(calls), micro, level)
        return data


def _preflight(run_dir: Path, experiment: ModAdd, sets: list[str], steps: int = 20):
    _, cfg = load_target("modadd", "smoke", sets, None)
    result = run_preflight(experiment, cfg, torch.device("cpu"), run_dir, steps, 1000, 300.0)
    return result, {c.name: c for c in result.claims}


def _parameter_count(experiment: ModAdd) -> int:
    return len(list(experiment.build_model(load_target("modadd", "smoke", [], None)[1]).parameters()))


def _matrix_count(experiment: ModAdd) -> int:
    """Its weight matrices: the update/weight band judges those (vectors carry values, not scales)."""
    return sum(1 for p in experiment.build_model(load_target("modadd", "smoke", [], None)[1]).parameters()
               if p.dim() >= 2)


def test_preflight_fails_parameters_that_never_receive_a_gradient(tmp_path: Path):
    result, claims = _preflight(tmp_path / "pf", DeadParametersModAdd(), [])
    claim = claims["layers without gradient"]
    assert claim.verdict == "fail" and claim.value == f"2 of {_parameter_count(ModAdd()) + 2}: unused, zeroed", claim
    assert result.verdict == "NOT READY" and "2 parameters never receive a gradient" in result.reasons


def test_preflight_fails_a_resume_that_does_not_reproduce_the_run(tmp_path: Path):
    result, claims = _preflight(tmp_path / "pf", CountingDataModAdd(), [])
    claim = claims["resume"]
    assert claim.verdict == "fail" and claim.value.startswith("differs (step 11: "), claim
    assert result.verdict == "NOT READY" and "resume does not reproduce the run" in result.reasons
    # the rest of the run was healthy: the resume check alone made it NOT READY
    assert claims["layers without gradient"].verdict == "pass" and claims["run"].verdict == "pass"


def test_preflight_warns_on_layers_whose_updates_are_outside_the_ratio_band(tmp_path: Path):
    # eight steps at three times the smoke LR, then an LR of exactly 0 (and so no weight decay:
    # AdamW scales it by the LR): from step 9 on no weight moves.  The probe looks at every second
    # step: 4 of its 20 (0, 2, 4, 6) moved the weights, 16 did not, so every median ratio is 0.
    result, claims = _preflight(tmp_path / "pf", ModAdd(), [
        "schedule.phases=[{kind: constant, steps: 8, start: 3}, {kind: constant, steps: 0, start: 0}]"], steps=40)
    claim, n = claims["update/weight ratio"], _matrix_count(ModAdd())
    assert claim.verdict == "warn" and claim.value.endswith(f"{n} of {n} outside [1e-06, 0.1]"), claim
    assert claim.value.startswith("median per layer from 0 (")
    assert f"{n} layers with update/weight ratio outside the band" in result.reasons


def test_preflight_names_a_health_policy_stop_not_non_finite_gradients(tmp_path: Path):
    # a bound on the step column: the collapse detector's stop policy fires at step 12 exactly --
    # mid-run checkpoint (10) + 2, the last step the resume check replays, so the reloaded run
    # meets the same stop (that used to escape from the resume check as a traceback)
    result, claims = _preflight(tmp_path / "pf", ModAdd(), ["health.collapse=stop", "health.bounds={step: [0, 11.5]}"])
    why = "health policy: out of bounds: step = 12 outside [0, 11.5] (health.collapse=stop)"
    assert claims["run"].verdict == "fail" and claims["run"].value == f"stopped at step 12 of 20: {why}"
    assert result.verdict == "NOT READY" and result.reasons[0] == f"run stopped at step 12: {why}"
    # the gradients were finite all along, and the steps before the stop were measured as usual
    finite = claims["gradients finite"]
    assert finite.verdict == "pass" and finite.value == "all 12 logged grad norms finite"
    assert "non-finite gradients" not in result.reasons
    resume = claims["resume"]
    assert resume.verdict == "pass" and resume.value.startswith("bitwise identical"), resume
    assert resume.evidence.endswith(f"; the reloaded run was stopped: {why}")


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------

# the default run directory of `preflight modadd --preset smoke`: an old one sits there in the
# refusal cases, and a refusal must leave it as it is
OLD_RUN = Path("runs/modadd-smoke-preflight")
PREFLIGHT = ("preflight", "modadd", "--preset", "smoke")

REFUSALS = {  # arguments, and what the one line must say
    "steps-19": (("--steps", "19"), ("--steps 19", "allowed: 20", "to 1,000,000,000")),
    "steps-huge": (("--steps", "1000000001"), ("--steps 1000000001", "allowed: 20", "to 1,000,000,000")),
    "planned-steps-0": (("--steps", "20", "--planned-steps", "0"), ("--planned-steps 0", "allowed: 1 to")),
    "planned-steps-huge": (("--steps", "20", "--planned-steps", str(10**30)),
                           (f"--planned-steps {10**30}", "allowed: 1 to 1,000,000,000")),
    "max-seconds-0": (("--steps", "20", "--max-seconds", "0"), ("--max-seconds 0.0", "must be > 0")),
    # NaN compares false with everything: `<= 0` let it through, and a NaN budget never ends a run
    "max-seconds-nan": (("--steps", "20", "--max-seconds", "nan"), ("--max-seconds nan", "must be > 0")),
}

# Cases in a subprocess of their own (`python -m trainlab`, ~4 CPU-seconds of imports each): the
# exit code and the streams as a user gets them, for a verdict that is no failure and for the run
# that used to end in a traceback.  The other CLI cases call trainlab.cli.main in this process,
# the same code without the interpreter start.
SUBPROCESS_CASES = {
    # one step fits in a millisecond budget: too few rows to judge the learning signal
    "time-budget": PREFLIGHT + ("--steps", "20", "--max-seconds", "0.001", "--run-dir", "pf"),
    # the LR climbs to 30000x over the run: the loss explodes, then goes non-finite (train.nonfinite=stop)
    "exploding": PREFLIGHT + ("--steps", "40", "--set", "train.clip=0", "--set",
                              "schedule.phases=[{kind: linear, steps: 0, start: 1, end: 30000}]", "--run-dir", "pf"),
}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Everything under `root`: files as bytes, directories as None."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _put_old_run(cwd: Path) -> None:
    (cwd / OLD_RUN).mkdir(parents=True)
    (cwd / OLD_RUN / "metrics.csv").write_text("step,loss\n1,3.1\n")


@dataclass
class CliOutcome:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    before: dict
    after: dict

    def preflight_json(self) -> dict:
        return json.loads((self.cwd / "pf" / "preflight.json").read_text())

    def claims(self) -> dict[str, dict]:
        return {c["name"]: c for c in self.preflight_json()["claims"]}


def _subprocess_case(name: str, cwd: Path) -> CliOutcome:
    before = snapshot(cwd)
    proc = trainlab(*SUBPROCESS_CASES[name], cwd=cwd, timeout=300)
    return CliOutcome(proc.returncode, proc.stdout, proc.stderr, cwd, before, snapshot(cwd))


@pytest.fixture(scope="module", autouse=True)
def subprocesses(request, tmp_path_factory):
    """The subprocess cases that the selected tests of this module need, started when the module's
    first test starts, so they run while the in-process tests do (case name -> a function waiting
    for its outcome)."""
    needed = {case for item in request.session.items if item.module is request.module
              for case in getattr(item.function, "subprocess_cases", ())}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures: dict[str, Future] = {name: pool.submit(_subprocess_case, name, tmp_path_factory.mktemp(name))
                                      for name in sorted(needed)}
        yield {name: f.result for name, f in futures.items()}


def uses_subprocess(*cases: str):
    def mark(fn):
        fn.subprocess_cases = cases
        return fn
    return mark


def _in_process(args: tuple[str, ...], cwd: Path, monkeypatch, capsys) -> CliOutcome:
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    code = cli_main(list(args))
    out = capsys.readouterr()
    return CliOutcome(code, out.out, out.err, cwd, before, snapshot(cwd))


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refusals_exit_2_with_one_line_and_write_nothing(refusal: str, tmp_path, monkeypatch, capsys):
    _put_old_run(tmp_path)
    out = _in_process(PREFLIGHT + REFUSALS[refusal][0], tmp_path, monkeypatch, capsys)
    where = f"{refusal}\n--- stdout:\n{out.stdout}--- stderr:\n{out.stderr}"
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr, where
    line = out.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("trainlab: error: ") and out.stdout == "", where
    for needle in REFUSALS[refusal][1]:
        assert needle in line, where
    assert out.after == out.before, where  # the old run directory was not moved aside, nothing new appeared


@uses_subprocess("time-budget")
def test_too_few_rows_to_judge_is_uncertain_exit_1(subprocesses):
    out = subprocesses["time-budget"]()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    report, claims = out.preflight_json(), out.claims()
    assert report["verdict"] == "UNCERTAIN" and report["steps_run"] == 1
    assert claims["run"]["verdict"] == "info" and "1 of 20 steps" in claims["run"]["value"]
    learning = claims["learning signal"]
    assert learning["verdict"] == "not measured" and learning["value"].startswith("1 finite loss rows")
    assert learning["value"] in report["reasons"]
    assert not [c for c in claims.values() if c["verdict"] == "fail"]
    assert f"trainlab: preflight UNCERTAIN: {'; '.join(report['reasons'])} -> pf/report.md" in out.stdout


def test_a_critical_detector_alert_fails_the_preflight_and_every_detector_verdict_is_in_its_report(tmp_path: Path):
    # the collapse detector on warn: its critical alert at step 12 does not stop the run, but a run
    # that a detector calls broken is not READY; the other detectors' verdicts are reported too
    run_dir = tmp_path / "pf"
    result, _ = _preflight(run_dir, ModAdd(), ["health.collapse=warn", "health.bounds={step: [0, 11.5]}"])
    assert result.verdict == "NOT READY"
    assert "detector collapse: step 12: out of bounds: step = 12 outside [0, 11.5]" in result.reasons
    detectors = {c["name"]: c for c in json.loads((run_dir / "check.json").read_text())["claims"]}
    assert detectors["collapse"]["verdict"] == "fail" and set(detectors) >= {"divergence", "spike", "stuck"}
    report = (run_dir / "report.md").read_text()
    assert all(f"| {name.replace('_', chr(92) + '_')} |" in report for name in detectors), report  # Markdown escapes _


def test_the_terminal_shows_the_detectors_that_fired_and_which_ones_decide(tmp_path, monkeypatch, capsys):
    # collapse (no preflight claim answers it) fails; stuck at the start of a run that then learns is
    # shown as information: the learning signal over the whole run decides
    out = _in_process(PREFLIGHT + ("--steps", "20", "--set", "health.collapse=warn", "--set",
                                   "health.bounds={step: [0, 11.5]}", "--run-dir", "pf"), tmp_path, monkeypatch, capsys)
    assert out.returncode == 1, out.stderr
    lines = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("  detector ")}
    assert lines["collapse"].split()[2] == "FAIL" and "step 12: out of bounds" in lines["collapse"]
    detectors = {c["name"]: c for c in json.loads((tmp_path / "pf" / "check.json").read_text())["claims"]}
    fired = {name for name, c in detectors.items() if c["verdict"] in ("warn", "fail")}
    assert set(lines) == fired  # every detector that fired, no other
    assert lines["stuck"].split()[2] == "INFO" and "the learning signal claim judges the whole run" in lines["stuck"]


def test_a_memory_guard_stop_is_reported_as_such_with_the_host_memory_failure(tmp_path, monkeypatch, capsys):
    # any process is over a 10 MB ceiling: the memory guard stops the run at its first poll (step 10)
    out = _in_process(PREFLIGHT + ("--steps", "20", "--set", "memory.host_ceiling_gb=0.01", "--run-dir", "pf"),
                      tmp_path, monkeypatch, capsys)
    assert out.returncode == 1, out.stderr
    report, claims = out.preflight_json(), out.claims()
    assert report["verdict"] == "NOT READY"
    run = claims["run"]
    assert run["verdict"] == "fail" and run["value"].startswith("stopped at step 10 of 20: memory guard: host RAM ")
    assert "over memory.host_ceiling_gb=0.01" in run["value"]
    assert report["reasons"][0].startswith("run stopped at step 10: memory guard: host RAM ")
    assert "non-finite gradients" not in report["reasons"] and claims["gradients finite"]["verdict"] == "pass"
    host = claims["host memory"]
    assert host["verdict"] == "fail" and "of 0.01 GB (ceiling)" in host["value"]
    assert "host memory does not fit" in report["reasons"]
    peak = max(r["peak_ram_gb"] for r in read_metrics(tmp_path / "pf" / "metrics.csv"))
    assert peak > 0.01 and f"peak {peak:.3g} GB" in host["value"]
    assert "trainlab: preflight NOT READY: run stopped at step 10: memory guard" in out.stdout


@uses_subprocess("exploding")
def test_an_exploding_run_is_diverging_and_stopped_not_a_traceback(subprocesses):
    out = subprocesses["exploding"]()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    losses = [r["loss"] for r in read_metrics(out.cwd / "pf" / "metrics.csv")]
    finite = [v for v in losses if math.isfinite(v)]
    # the premise, read off the data: it started near a random guess, rose a hundredfold, then broke
    assert finite[0] < 1.1 * BASELINE and finite[-1] > 100 * BASELINE and not math.isfinite(losses[-1])
    report, claims = out.preflight_json(), out.claims()
    assert report["verdict"] == "NOT READY"
    assert claims["learning signal"]["verdict"] == "fail" and claims["learning signal"]["value"].startswith("diverging")
    stop = claims["run"]
    assert stop["verdict"] == "fail" and f"stopped at step {len(losses)} of 40: non-finite loss=nan" in stop["value"]
    assert claims["numerics"]["verdict"] == "fail" and claims["numerics"]["value"].startswith("1 non-finite loss rows")
    assert "trainlab: preflight NOT READY: run stopped at step" in out.stdout


# --------------------------------------------------------------------------------------------
# The saved verdicts (health/evidence.py) as the report reads them
# --------------------------------------------------------------------------------------------

CLAIM = {"name": "resume", "verdict": "pass", "value": "bitwise identical", "evidence": "e", "source": "preflight"}


def test_saved_verdicts_are_read_from_both_files_and_absent_ones_are_none(tmp_path: Path):
    assert claims_for(tmp_path) is None  # nobody judged this run
    (tmp_path / "preflight.json").write_text(json.dumps({"verdict": "READY", "claims": [CLAIM]}))
    (tmp_path / "check.json").write_text(json.dumps({"claims": [{**CLAIM, "name": "stuck", "verdict": "warn"}]}))
    assert [(c.name, c.verdict) for c in claims_for(tmp_path)] == [("resume", "pass"), ("stuck", "warn")]


@pytest.mark.parametrize("text,says", [
    ("{\"claims\": [", "preflight.json: not valid JSON"),                    # a preflight killed mid-write
    ("[]", "preflight.json: must be a JSON object"),                          # used to raise AttributeError
    ("{\"claims\": {\"name\": \"x\"}}", "preflight.json: must be a JSON object whose 'claims' is a list"),
    ("{\"claims\": [\"resume\"]}", "preflight.json: each claim must be a JSON object"),
    ("{\"claims\": [{\"name\": \"x\", \"verdict\": \"great\"}]}", "verdict must be one of"),
])
def test_a_malformed_verdict_file_is_a_usage_error_of_trainlab_report(text: str, says: str, tmp_path: Path,
                                                                      monkeypatch, capsys):
    """Left out silently, a verdict that could not be read would make a judged run look unjudged."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,loss\n1,3.1\n")
    (run / "preflight.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(says)):
        claims_for(run)
    out = _in_process(("report", "run"), tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    line = out.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("trainlab: error: run directory run: a saved verdict file is "
                                                     "malformed (") and says in line, line
    assert out.after == out.before  # no report written


def test_checkpoint_disk_claim_counts_what_the_retention_keeps_against_the_free_space(tmp_path: Path, monkeypatch):
    import collections

    from trainlab.health import preflight

    step = tmp_path / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"\0" * 3 * 1024**2)
    (step / "state.pt").write_bytes(b"\0" * 1024**2)
    cfg = load_target("modadd", "smoke", ["ckpt.keep=3", "ckpt.best_metric=val_loss", "ckpt.every=10"], None)[1]
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(0, 0, 1024**3))
    claim = preflight._checkpoint_disk_claim(tmp_path, cfg, planned_steps=100)
    assert claim.verdict == "pass", claim
    assert claim.value == ("4 MB per checkpoint; ckpt.keep 3 + the best retains at most 4: 16 MB of 1 GB free "
                           "(keeping all 10 of a checkpoint every 10 steps would take 40 MB)")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(0, 0, 15 * 1024**2))
    assert preflight._checkpoint_disk_claim(tmp_path, cfg, planned_steps=100).verdict == "fail"
    assert preflight._checkpoint_disk_claim(tmp_path / "none", cfg, 100).verdict == "not measured"

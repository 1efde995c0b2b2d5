"""Faults injected into a real `python -m trainlab` process, for the tests of its failure paths.

tests/test_cli_paths.py puts this folder first on PYTHONPATH and names the fault in
TRAINLAB_TEST_FAULT; Python imports `sitecustomize` at start-up, before the CLI runs, so the CLI
under test is the unmodified one.  Faults (N: the optimizer step being computed, counted from 1):

    raise@N    RuntimeError from modadd's loss while computing step N (a bug in an experiment)
    sigint@N   one SIGINT to the process itself while computing step N (Ctrl-C, once)
    sigint2@N  two SIGINTs while computing step N (Ctrl-C pressed again: the user insists)
    sigterm@N  one SIGTERM to the process itself while computing step N
    sigkill@N  SIGKILL to the process itself while computing step N (a rank that dies)
    oom@N      torch.OutOfMemoryError from modadd's loss while computing step N

Under torchrun, TRAINLAB_TEST_FAULT_RANK=R fires the fault in rank R only (default: every rank).

Each fault fires once per process.  Without TRAINLAB_TEST_FAULT this file does nothing.
"""

import os

_FAULT = os.environ.get("TRAINLAB_TEST_FAULT", "")
if os.environ.get("TRAINLAB_TEST_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    _FAULT = ""  # another rank's fault

if _FAULT:
    import signal

    from trainlab.experiments.modadd import ModAdd

    _kind, _, _at = _FAULT.partition("@")
    _step = int(_at)
    if _kind not in ("raise", "sigint", "sigint2", "sigterm", "sigkill", "oom"):
        raise SystemExit(f"sitecustomize: unknown TRAINLAB_TEST_FAULT {_FAULT!r}")
    _original_loss = ModAdd.loss
    _fired = []

    def _loss_with_fault(self, model, batch, ctx):
        # ctx.step is the number of steps already taken, so the step being computed is ctx.step + 1
        if not _fired and ctx.step + 1 == _step:
            _fired.append(True)
            if _kind == "raise":
                raise RuntimeError(f"injected fault at step {_step}")
            if _kind == "oom":
                import torch

                raise torch.OutOfMemoryError(f"injected out-of-memory error at step {_step}")
            if _kind in ("sigterm", "sigkill"):
                os.kill(os.getpid(), signal.SIGTERM if _kind == "sigterm" else signal.SIGKILL)
                return _original_loss(self, model, batch, ctx)
            os.kill(os.getpid(), signal.SIGINT)
            if _kind == "sigint2":
                os.kill(os.getpid(), signal.SIGINT)
        return _original_loss(self, model, batch, ctx)

    ModAdd.loss = _loss_with_fault

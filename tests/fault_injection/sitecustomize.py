"""Faults injected into a real `python -m trainlab` process, for the tests of its failure paths.

tests/test_cli_paths.py puts this folder first on PYTHONPATH and names the fault in
TRAINLAB_TEST_FAULT; Python imports `sitecustomize` at start-up, before the CLI runs, so the CLI
under test is the unmodified one.  Faults (N: the optimizer step being computed, counted from 1):

    raise@N    RuntimeError from modadd's loss while computing step N (a bug in an experiment)
    sigint@N   one SIGINT to the process itself while computing step N (Ctrl-C, once)
    sigint2@N  two SIGINTs while computing step N (Ctrl-C pressed again: the user insists)

Each fault fires once per process.  Without TRAINLAB_TEST_FAULT this file does nothing.
"""

import os

_FAULT = os.environ.get("TRAINLAB_TEST_FAULT", "")

if _FAULT:
    import signal

    from trainlab.experiments.modadd import ModAdd

    _kind, _, _at = _FAULT.partition("@")
    _step = int(_at)
    if _kind not in ("raise", "sigint", "sigint2"):
        raise SystemExit(f"sitecustomize: unknown TRAINLAB_TEST_FAULT {_FAULT!r}")
    _original_loss = ModAdd.loss
    _fired = []

    def _loss_with_fault(self, model, batch, ctx):
        # ctx.step is the number of steps already taken, so the step being computed is ctx.step + 1
        if not _fired and ctx.step + 1 == _step:
            _fired.append(True)
            if _kind == "raise":
                raise RuntimeError(f"injected fault at step {_step}")
            os.kill(os.getpid(), signal.SIGINT)
            if _kind == "sigint2":
                os.kill(os.getpid(), signal.SIGINT)
        return _original_loss(self, model, batch, ctx)

    ModAdd.loss = _loss_with_fault

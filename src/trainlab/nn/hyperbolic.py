"""geoopt (the Poincare ball, RiemannianAdam), imported so that a run's numbers do not depend on how
many times its functions ran before.

geoopt decorates its manifold arithmetic with torch.jit.script.  TorchScript's profiling executor runs
a scripted function as written for its first calls and then swaps in an optimised graph whose floats
differ in the last bits: a fresh run reproduces itself, but a resumed process starts counting again, so
its steps after the resume differ from the uninterrupted run's (measured: the loss at step 25 of a
smoke run, 15.751228 against 15.751233).  Imported with TorchScript off, the decorated functions stay
plain Python (torch.jit.script returns them unchanged): the same arithmetic at every call, so resume
stays exact.  TorchScript is deprecated in torch 2.x; nothing is lost but a fusion these tiny tensors
do not need.  If geoopt was imported before trainlab could do this, its functions are scripted and
`load_geoopt` says so once.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import torch

_WARNED = False


def load_geoopt():
    """The geoopt module, imported with TorchScript off (see the module docstring)."""
    global _WARNED
    if "geoopt" in sys.modules:
        geoopt = sys.modules["geoopt"]
        if not getattr(geoopt, "_trainlab_unscripted", False) and not _WARNED:
            _WARNED = True
            print("trainlab: geoopt was imported before trainlab, with its functions TorchScript-compiled; a resumed "
                  "run may differ from an uninterrupted one in the last bits (import trainlab first, or set "
                  "PYTORCH_JIT=0)", file=sys.stderr)
        return geoopt
    state = torch.jit._state  # the switch torch.jit.script reads; public API offers only the PYTORCH_JIT variable
    was_enabled = bool(state._enabled)
    state.disable()
    try:
        with warnings.catch_warnings():
            # torch 2.x warns that torch.jit.script is deprecated at each of geoopt's 70-odd decorators
            warnings.simplefilter("ignore", DeprecationWarning)
            geoopt = importlib.import_module("geoopt")
    finally:
        if was_enabled:
            state.enable()
    geoopt._trainlab_unscripted = True
    return geoopt

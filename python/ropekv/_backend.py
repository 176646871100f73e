"""Backend choice: the compiled extension where it serves the device, else the
pure-torch fallback, or what ROPEKV_BACKEND=native|torch|auto forces.

The choice is made lazily, once per device type, under a lock (first calls may
come from several threads). When the fallback is chosen automatically, one log
line on the 'ropekv' logger says why.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Dict

import torch

from . import _fallback, _native
from ._validate import Plan

log = logging.getLogger("ropekv")
_lock = threading.Lock()
_chosen: Dict[str, Callable[[Plan], None]] = {}
_logged = False

BACKENDS = ("auto", "native", "torch")


def requested() -> str:
    name = os.environ.get("ROPEKV_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"ROPEKV_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _choose(device: torch.device) -> Callable[[Plan], None]:
    global _logged
    name = requested()
    if name == "torch":
        reason = "ROPEKV_BACKEND=torch"
    elif _native.serves(device):
        return _native.run
    elif name == "native":
        why = _native.IMPORT_ERROR or f"the compiled extension has no kernels for {device.type} tensors"
        raise RuntimeError(f"ROPEKV_BACKEND=native, but the native backend is unavailable: {why}")
    elif not _native.available():
        reason = f"the compiled extension could not be imported ({_native.IMPORT_ERROR})"
    else:
        reason = f"the compiled extension has no kernels for {device.type} tensors"
    if not _logged:
        log.warning("ropekv: using the pure-torch fallback because %s", reason)
        _logged = True
    return _fallback.run


def backend_for(device: torch.device) -> Callable[[Plan], None]:
    fn = _chosen.get(device.type)
    if fn is None:
        with _lock:
            fn = _chosen.get(device.type)
            if fn is None:
                fn = _chosen[device.type] = _choose(device)
    return fn


def reset() -> None:
    """Forgets the choices made (after changing ROPEKV_BACKEND, e.g. in tests)."""
    global _logged
    with _lock:
        _chosen.clear()
        _logged = False


def name_of(fn: Callable[[Plan], None]) -> str:
    return "torch" if fn is _fallback.run else "native"

"""A training step compiled whole (issue 20, item 2): ``torch.compile(fullgraph=True, dynamic=False)`` of a step
function with static shapes, in the mode a stage's ``compile_step`` setting names, falling back to the eager step
with one warning when compiling fails.

The settings (``COMPILE_STEPS``):

- ``"off"``: the eager step, as before (the default; measured on CPU: docs/performance.md, "A captured edge
  step");
- ``"default"``: ``torch.compile``'s default mode (inductor kernels, no CUDA graphs; the mode the CPU test and
  benchmark row use);
- ``"reduce-overhead"``: inductor plus CUDA graphs (the forward and backward graphs replayed as one launch each,
  what the launch-bound GPU step needs; CUDA only, torch skips the graphs elsewhere);
- ``"auto"``: ``"reduce-overhead"`` on CUDA, ``AUTO_ON_CPU`` elsewhere (``"off"``: on the 2-core CPU the compiled
  quickstart edge step took 0.75-0.91x the eager time, but compiling it takes about 2 minutes, which pays back
  only after about 10,000 steps at batch 8).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

COMPILE_STEPS = ("off", "default", "reduce-overhead", "auto")
AUTO_ON_CPU = "off"  # measured: docs/performance.md, "A captured edge step"


def check_compile_step(setting: str) -> str:
    if setting not in COMPILE_STEPS:
        raise ValueError(f"compile_step must be one of {COMPILE_STEPS}, got {setting!r}")
    return setting


def resolve_compile_step(setting: str, device: torch.device | str) -> str:
    """The mode ``setting`` means on ``device``: ``"off"``, ``"default"`` or ``"reduce-overhead"``."""
    check_compile_step(setting)
    if setting != "auto":
        return setting
    return "reduce-overhead" if torch.device(device).type == "cuda" else AUTO_ON_CPU


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: dynamo's errors (a graph break under ``fullgraph``, a backend failure
    such as a missing C++ compiler) and inductor's."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    inductor_error = getattr(getattr(torch, "_inductor", None), "exc", None)
    if inductor_error is not None and hasattr(inductor_error, "InductorError"):
        errors.append(inductor_error.InductorError)
    return tuple(errors)


class CapturedStep:
    """``fn`` compiled in ``mode`` (``"default"`` or ``"reduce-overhead"``), called like ``fn``; returns None once
    compiling has failed (the caller then runs its eager step), after one warning that names the error.

    ``fn`` returns a dict of tensors. With ``"reduce-overhead"`` every call starts a new CUDA-graph step
    (``torch.compiler.cudagraph_mark_step_begin``) and the outputs are cloned, since the next replay overwrites
    the graph's output buffers while the loggers may still hold them.
    """

    def __init__(self, fn: Callable[..., dict[str, Tensor]], mode: str, name: str) -> None:
        if mode not in ("default", "reduce-overhead"):
            raise ValueError(f"CapturedStep compiles in mode 'default' or 'reduce-overhead', got {mode!r}")
        self.mode, self.name, self.failed = mode, name, False
        self.compiled = torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor] | None:
        if self.failed:
            return None
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = self.compiled(*args, **kwargs)
        except compile_errors() as error:
            self.failed = True
            first = (str(error).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"[dymu] {self.name}: compile_step={self.mode!r} could not compile the step, running it "
                          f"eagerly ({type(error).__name__}: {first})", RuntimeWarning, stacklevel=2)
            return None
        if self.mode == "reduce-overhead":
            out = {key: value.clone() for key, value in out.items()}
        return out

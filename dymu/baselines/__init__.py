"""The baselines DYMU is compared with, in plain PyTorch (no Lightning below this package).

Every baseline model is a ``dymu.baselines.base.BaselineModel``: ``forward(x, r) -> {task: output}``,
``cost() -> {"params", "flops"}``, ``control_parameters()`` and ``from_checkpoint(path)``;
``dymu.baselines.base.load_baseline(path)`` loads any of them by the kind its checkpoint records.
"""

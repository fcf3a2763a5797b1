"""The baselines DYMU is compared with, in plain PyTorch (no Lightning below this package): the dynamic ones
(PHN, PHN-BN, static multi-task networks per preference) and the static architecture searches (Learning to
Branch, BMTAS, feature partitioning).

Every baseline model is a ``dymu.baselines.base.BaselineModel``: ``forward(x, r) -> {task: output}``,
``cost() -> {"params", "flops"}``, ``control_parameters()`` and ``from_checkpoint(path)``;
``dymu.baselines.base.load_baseline(path)`` loads any of them by the kind its checkpoint records.
"""

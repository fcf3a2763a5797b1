"""The evaluation protocol's test loop: one pass over the test set scores every configuration at once."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from dymu.evaluation import Evaluated, LossSums, configuration_forwards
from dymu.model import DynamicMultiTaskModel
from dymu.tasks import Task


class StreamedLosses(L.LightningModule):
    """Streams the test set once through several forwards (configuration key -> forward, built by
    ``build_forwards`` on the device when the test loop starts) and keeps only their support-weighted loss sums
    (``dymu.evaluation.LossSums``): memory does not grow with the test set. Under DDP each process sees its own
    unrepeated shard (the data modules' ``make_loader``) and the sums (a torchmetrics ``Metric``) are added over
    processes at the end, so every sample counts once.

    After ``Trainer.test``: ``losses`` (configuration key -> unscaled mean losses ``[L_t]``, CPU) and
    ``num_samples`` (over all processes).
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.sums: LossSums | None = None
        self.losses: dict[Hashable, Tensor] | None = None
        self.num_samples = 0

    def build_forwards(self) -> dict[Hashable, Callable[[Tensor], dict[str, Tensor]]]:
        raise NotImplementedError

    def on_test_start(self) -> None:
        # Built outside inference mode: specialised trees are ordinary modules (parameters can be copied and
        # BatchNorm statistics re-estimated), used afterwards under the loop's inference mode.
        with torch.inference_mode(False), torch.no_grad():
            forwards = self.build_forwards()
        self.sums = LossSums(forwards, self.tasks).to(self.device)
        self.losses, self.num_samples = None, 0

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        assert self.sums is not None
        self.sums.update(batch)

    def on_test_epoch_end(self) -> None:
        assert self.sums is not None
        self.losses, self.num_samples = self.sums.compute()  # summed over the DDP processes
        self.sums = None  # the forwards hold the specialised trees


class ProtocolEvaluation(StreamedLosses):
    """The evaluation protocol's configurations of a controllable model: every (method, preference) pair of
    ``evaluated`` (the anchor, each distinct tree, each preference's adapted tree, each recalibrated tree), the
    forwards built once (BatchNorm shifts per preference, recalibrated trees per architecture). With BatchNorm
    batch statistics (``bn_statistics: batch``) the adapted losses depend on how the samples are batched, so
    they differ between process counts as they differ between batch sizes.

    Args:
        model: the controllable model.
        tasks: the tasks whose losses are measured (the data module's, with its loss scales).
        evaluated: every (method, preference) pair to score.
        calibration: training images for the recalibrated-BatchNorm trees (needed when ``evaluated`` has them).
    """

    def __init__(self, model: DynamicMultiTaskModel, tasks: Sequence[Task], evaluated: Sequence[Evaluated],
                 calibration: Sequence[Tensor] | None = None) -> None:
        super().__init__(tasks)
        self.model = model
        self.evaluated = list(evaluated)
        self.calibration = list(calibration) if calibration else None

    def build_forwards(self) -> dict[Hashable, Callable[[Tensor], dict[str, Tensor]]]:
        calibration = [x.to(self.device) for x in self.calibration] if self.calibration else None
        return configuration_forwards(self.model, self.evaluated, calibration)


class ModulesEvaluation(StreamedLosses):
    """Fixed networks (configuration key -> module, e.g. a baseline's network for each preference), each
    scored on the whole test set in one pass."""

    def __init__(self, networks: Mapping[Hashable, nn.Module], tasks: Sequence[Task]) -> None:
        super().__init__(tasks)
        self.networks = nn.ModuleList(networks.values())
        self.keys = list(networks)

    def build_forwards(self) -> dict[Hashable, Callable[[Tensor], dict[str, Tensor]]]:
        return {key: net.eval() for key, net in zip(self.keys, self.networks)}

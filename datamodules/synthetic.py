"""The synthetic data modules (no files): dense multi-task scenes and the Learning-to-Branch regression tasks.

The data sets are generated in memory (``datamodules.datasets.synthetic``; the scenes render each sample on demand,
so memory does not grow with a split's size); both modules serve them through ``MultiTaskDataModule`` like the data
sets read from disk. The same seed gives the same tensors in every process.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from datamodules.base import MultiTaskDataModule, check_batch_fits, merge_scales, select_tasks
from datamodules.datasets.synthetic import (
    CLASS_MAPS,
    DENSE_TASKS,
    RegressionTasks,
    SyntheticRegressionDataset,
    SyntheticScenesDataset,
    check_positive,
    stream_generator,
)
from dymu.tasks import make_task

# Loss scales w_t that bring every scaled loss of an untrained net near semseg's (see the class docstring).
DEFAULT_SCALES: dict[str, float] = {"semseg": 1.0, "depth": 0.25, "normals": 2.5, "edges": 20.0}


class _GeneratedDataModule(MultiTaskDataModule):
    """What the generated data modules share: split sizes (``num_train``, ``num_val``, ``num_test``) and the
    seed. There is no augmentation: one dataset per split, generated on first use."""

    augmented = False

    def __init__(self, sizes: dict[str, int], batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.seed = seed
        self._sizes = dict(sizes)
        self.check_data()

    def check_split(self, split: str) -> None:
        """The split's size is positive; the training split holds at least one batch."""
        check_positive(**{f"num_{split}": self._sizes[split]})
        if split == "train":
            check_batch_fits(self._sizes["train"], self.batch_size, self.split_source(split))

    def split_source(self, split: str) -> str:
        return f"num_{split} ({self._sizes[split]})"


class SyntheticScenesDataModule(_GeneratedDataModule):
    """Ray-cast scenes (a wall, a ground plane, spheres and boxes) with dense labels from one geometry.

    See ``datamodules.datasets.synthetic.render_scenes`` for the scene, the camera and the label definitions.
    Depth and normals are tied closely (normals are the depth surface's orientation); semseg and edges are
    tied (every semantic boundary is an edge) but edges also mark occlusions between objects of one class,
    and the creases between box faces (normals only) are not edges. The image adds texture edges that no
    label has.

    Default loss scales ``w_t`` (``DEFAULT_SCALES``): semseg 1, depth 0.25, normals 2.5, edges 20, chosen so
    the scaled losses of an untrained net are alike. Unscaled losses over the 512 default training scenes
    (64x64, seed 0) for a zero prediction / for N(0, 1) outputs: semseg 1.39 / 1.72 (ln 4 at zero), depth
    5.85 / 5.85 (L1 in metres; mean depth 5.8 m), normals 0.40 / 0.67, edges 0.060 / 0.070 (weighted BCE;
    4.0 % of pixels are edges). Scaled: 1.39 / 1.72, 1.46 / 1.46, 1.01 / 1.67, 1.20 / 1.39. At 32x32 edges
    are 7.9 % of pixels and their scaled loss 1.68 / 1.96; the others barely change. The paper's normals 10
    and edges 50 would make those two tasks dominate (4.0 and 3.0 at zero) on this data.

    Args:
        tasks: 2..4 distinct names among ``semseg, depth, normals, edges``, in head order; defaults to
            ``["semseg", "depth", "normals"]``.
        num_train: training scenes.
        num_val: validation scenes.
        num_test: test scenes.
        image_size: height and width in pixels.
        num_classes: semantic classes: 4 (wall, ground, sphere, box), 3 (wall, ground, object) or
            2 (scene, object).
        scales: loss scale per task name, overriding ``DEFAULT_SCALES`` for the tasks it names.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        seed: seed of all generated data.
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 128,
        image_size: int = 64,
        num_classes: int = 4,
        scales: dict[str, float] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        super().__init__(sizes, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        names = select_tasks(tasks, DENSE_TASKS, default=["semseg", "depth", "normals"], min_count=2)
        if num_classes not in CLASS_MAPS:
            raise ValueError(
                f"num_classes {num_classes} is not supported; choose one of {sorted(CLASS_MAPS)} "
                "(4: wall, ground, sphere, box; 3: wall, ground, object; 2: scene, object)"
            )
        task_scales = merge_scales(names, DEFAULT_SCALES, scales)
        check_positive(image_size=image_size)
        self.image_size = image_size
        self.num_classes = num_classes
        self._tasks = [
            make_task(name, out_channels=num_classes if name == "semseg" else None, scale=task_scales[name])
            for name in names
        ]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input image: ``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)

    def make_dataset(self, split: str, train: bool) -> SyntheticScenesDataset:
        """The rendered scenes of ``split`` (from the split's stream of ``seed``)."""
        return SyntheticScenesDataset(self._sizes[split], self.image_size, self.num_classes, self.task_names,
                                      stream_generator(self.seed, split))


class SyntheticRegressionDataModule(_GeneratedDataModule):
    """The regression tasks of Learning to Branch (section 4.1): ``T_{r,s} = act_r((B + delta_s) Z / phi)``.

    ``Z ~ N(0, I)`` in ``R^input_dim`` is the input; ``B`` (entries of variance 10) is shared by all tasks,
    each task has its own ``delta`` (variance 2), both ``(output_dim, input_dim)`` and fixed by ``seed``.
    Each group applies one activation (times its scale multiplier, on the argument), so tasks of a group
    differ only by their ``delta``. Every task's targets are standardised per output with the training
    split's mean and standard deviation, so a zero prediction has MSE about 1 for every task.

    Choices where the paper leaves room, with measurements (20000 samples, input_dim 64, output_dim 16,
    seed 0; Pearson correlation between two tasks' targets per output, averaged over outputs):

    - ``phi`` defaults to ``sqrt(3 * input_dim)`` rather than the paper's ``input_dim``: the pre-activation
      has std ``sqrt(12 * input_dim) / phi``, which is 2 with the default but only 0.43 with
      ``phi = input_dim``. At 0.43 every activation is close to its Taylor polynomial: sin and bent are
      nearly linear and square and sinc nearly +-x^2, so square-sinc correlate -0.70 across groups, as
      strongly as within (square 0.71, sinc 0.71). At std 2 within-group correlations (bent 0.81,
      square 0.71, sinc 0.64, sin 0.51, cos 0.48) exceed the cross-group ones (bent-square 0.17,
      bent-sinc -0.16, square-sinc -0.61, cos-square -0.38, sin-any 0.00), except that cos and sinc
      correlate 0.51, as close as the paper's setting 3 describes them.
    - ``delta`` is drawn per task, not per index ``s`` shared by the groups: sharing it would make
      ``(square, s)`` and ``(sinc, s)`` more correlated (-0.85) than two square tasks (0.70).
    - Scale multipliers multiply the activation's argument; on the output they would cancel in the
      standardisation. The paper's setting 2 is ``activations=["sin"] * 3, scale_multipliers=[1, 2, 3]``;
      with the default ``phi`` the groups of multiplier 2 and 3 are nearly noise (within-group
      correlation 0.08 and 0.01), with ``phi=input_dim`` all tasks stay related (0.68..0.82), as in the
      paper, where they all share one branch.

    Task names are ``f"{act}_{s}"`` (``s`` from 0), or ``f"{act}{group}_{s}"`` for every task when an
    activation appears in more than one group.

    Args:
        activations: one activation per group, each of ``sin, square, bent, cos, sinc``; defaults to
            ``["bent", "square", "sinc"]`` (the paper's setting 1).
        tasks_per_group: tasks per group, one number for all groups or one per group.
        input_dim: dimension of ``Z`` (the input).
        output_dim: dimension of each task's target.
        num_train: training samples.
        num_val: validation samples.
        num_test: test samples.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the matrices and of all samples.
        scale_multipliers: one factor per group on the activation's argument; defaults to 1 each.
        phi: the normalisation ``phi``: a number, ``"input_dim"`` (the paper's) or omitted for
            ``sqrt(3 * input_dim)`` (see above).
        noise_scale: the reading of the paper's ``B ~ N(0, 10)``, ``delta ~ N(0, 2)``: ``"variance"`` (default,
            see above) or ``"std"`` (standard deviations 10 and 2: two tasks' arguments then correlate
            100 / 104 = 0.96 instead of 10 / 12 = 0.83). docs/results.md compares the readings.
        input_distribution: ``Z``'s entries, ``"normal"`` (default) or ``"uniform"`` (unit variance); the paper
            does not say.
    """

    def __init__(
        self,
        activations: list[str] | None = None,
        tasks_per_group: int | list[int] = 2,
        input_dim: int = 64,
        output_dim: int = 16,
        num_train: int = 2000,
        num_val: int = 500,
        num_test: int = 500,
        batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        scale_multipliers: list[float] | None = None,
        phi: float | Literal["input_dim"] | None = None,
        noise_scale: Literal["variance", "std"] = "variance",
        input_distribution: Literal["normal", "uniform"] = "normal",
    ) -> None:
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        super().__init__(sizes, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        acts = list(activations) if activations is not None else ["bent", "square", "sinc"]
        self.problem = RegressionTasks(acts, tasks_per_group, input_dim, output_dim, num_train, seed,
                                       scale_multipliers, phi, noise_scale, input_distribution)
        self.input_dim, self.output_dim, self.phi = input_dim, output_dim, self.problem.phi
        self.activations, self.scale_multipliers = self.problem.activations, self.problem.scale_multipliers
        self._tasks = [
            make_task("regression", name=name, out_channels=output_dim) for name in self.problem.task_names
        ]

    @property
    def groups(self) -> list[list[str]]:
        """Task names per group (tasks that share an activation)."""
        return [list(group) for group in self.problem.groups]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(input_dim,)``."""
        return (self.input_dim,)

    def targets(self, inputs: Tensor) -> dict[str, Tensor]:
        """Standardised targets of every task for given inputs (``RegressionTasks.targets``).

        Args:
            inputs: ``(n, input_dim)``.

        Returns:
            Task name -> ``(n, output_dim)`` float32.
        """
        return self.problem.targets(inputs)

    def make_dataset(self, split: str, train: bool) -> SyntheticRegressionDataset:
        """The inputs of ``split`` (from the split's stream of ``seed``) with every task's target."""
        return SyntheticRegressionDataset(self.problem, split, self._sizes[split])

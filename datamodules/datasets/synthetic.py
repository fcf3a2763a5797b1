"""Synthetic data generated in memory from a seed: dense multi-task scenes (``SyntheticScenesDataset``, each
rendered on demand from its index) and the Learning-to-Branch regression tasks (``TensorDictDataset``s).

Everything is drawn with plain torch from generators seeded by ``4 * seed + stream`` (``stream_generator``;
streams: train 0, val 1, test 2, fixed task parameters 3), so the same seed gives the same tensors in every
process (DDP ranks included) and no two splits or seeds share a stream. Nothing is read from or written to disk.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

STREAMS = ("train", "val", "test", "parameters")


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """The generator of one stream (a split, or ``"parameters"``) of a seed: seeded with ``4 * seed + index``."""
    return torch.Generator().manual_seed(4 * seed + STREAMS.index(stream))


def check_positive(**sizes: int) -> None:
    """Raise ``ValueError`` naming the first size below 1."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


class TensorDictDataset(Dataset):
    """A dataset over a dict of tensors that share their first dimension; item ``i`` is ``{key: t[i]}``."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        lengths = {t.shape[0] for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors need the same first dimension, got {sorted(lengths)}")
        self.tensors = tensors
        self._length = lengths.pop()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: t[index] for key, t in self.tensors.items()}


# ----------------------------------------------------------------------------------------------------------
# Dense scenes
# ----------------------------------------------------------------------------------------------------------

DENSE_TASKS = ("semseg", "depth", "normals", "edges")

# Class of each surface kind (wall, ground, sphere, box) for each supported number of classes.
CLASS_MAPS: dict[int, tuple[int, int, int, int]] = {
    2: (0, 0, 1, 1),  # scene / object
    3: (0, 1, 2, 2),  # wall / ground / object
    4: (0, 1, 2, 3),  # wall / ground / sphere / box
}

_MAX_OBJECTS = 5
_FIELD_OF_VIEW = math.radians(60.0)
_AMBIENT = 0.25
_NOISE_STD = 0.02
_RENDER_CHUNK = 32
#: Default budget of a ``SyntheticScenesDataset``'s cache of rendered chunks, in bytes: it holds the quickstart's
#: training split (512 scenes of 32x32, 18 MiB) and the default one (512 of 64x64, 72 MiB with three tasks, 80 with
#: four) whole, so that shuffled epochs after the first render nothing, and bounds every larger split.
CACHE_BYTES = 128 * 2**20


def _uniform(generator: torch.Generator, shape: Sequence[int], low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def _rotate_pitch(v: Tensor, pitch: Tensor, inverse: bool = False) -> Tensor:
    """Rotate ``(..., 3)`` vectors about the x axis by ``pitch`` (camera -> world; ``inverse``: back).

    ``pitch`` has shape ``(n,)`` and ``v`` ``(n, ..., 3)``; a positive pitch tilts the view axis down.
    """
    shape = (-1,) + (1,) * (v.dim() - 2)
    cos, sin = pitch.cos().view(shape), pitch.sin().view(shape)
    if inverse:
        sin = -sin
    x, y, z = v.unbind(-1)
    return torch.stack((x, y * cos - z * sin, y * sin + z * cos), dim=-1)


def _draw_parameters(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """The random parameters of ``n`` scenes (everything ``render_scenes`` draws before the image noise)."""
    g = generator
    height = _uniform(g, (n,), 1.0, 2.0)
    pitch = torch.deg2rad(_uniform(g, (n,), 5.0, 20.0))
    wall = _uniform(g, (n,), 8.0, 12.0)
    elevation = torch.deg2rad(_uniform(g, (n,), 30.0, 70.0))
    azimuth = torch.deg2rad(_uniform(g, (n,), -60.0, 60.0))
    wall_colour = _uniform(g, (n, 3), 0.4, 0.9)
    ground_colour = _uniform(g, (n, 3), 0.3, 0.8)

    count = torch.randint(2, _MAX_OBJECTS + 1, (n,), generator=g)
    present = torch.arange(_MAX_OBJECTS) < count[:, None]
    is_sphere = (torch.rand(n, _MAX_OBJECTS, generator=g) < 0.5) & present
    radius = _uniform(g, (n, _MAX_OBJECTS), 0.4, 1.0)
    half = torch.where(is_sphere[..., None], radius[..., None], _uniform(g, (n, _MAX_OBJECTS, 3), 0.3, 0.9))
    depth_centre = 3.0 + (wall[:, None] - 4.5) * torch.rand(n, _MAX_OBJECTS, generator=g)
    lateral = depth_centre * _uniform(g, (n, _MAX_OBJECTS), -0.5, 0.5)
    colour = _uniform(g, (n, _MAX_OBJECTS, 3), 0.15, 1.0)
    return {
        "height": height, "pitch": pitch, "wall": wall, "elevation": elevation, "azimuth": azimuth,
        "wall_colour": wall_colour, "ground_colour": ground_colour, "present": present, "is_sphere": is_sphere,
        "radius": radius, "half": half, "depth_centre": depth_centre, "lateral": lateral, "colour": colour,
    }


def _draw_noise(n: int, image_size: int, generator: torch.Generator) -> Tensor:
    """The image noise of ``n`` scenes, ``(n, S * S, 3)`` standard normal (scaled by ``render_scenes``)."""
    return torch.randn((n, image_size * image_size, 3), generator=generator)


def skip_scenes(n: int, image_size: int, generator: torch.Generator) -> None:
    """Advance ``generator`` exactly as ``render_scenes(n, image_size, generator)`` does, without rendering."""
    _draw_parameters(n, generator)
    _draw_noise(n, image_size, generator)


def render_scenes(n: int, image_size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Ray-cast ``n`` random scenes and return the image with every dense label.

    World frame: y up, the ground is the plane y = 0 and a back wall the plane z = wall distance (8..12 m).
    The pinhole camera (60 degree field of view) sits at height 1..2 m above the origin, looks along +z and
    is pitched down by 5..20 degrees. Between two and five objects rest on the ground: spheres (radius
    0.4..1 m) and world-axis-aligned boxes (half sizes 0.3..0.9 m). Every ray hits the wall or something
    in front of it, so depth and normals are valid everywhere and no label is ignored.

    Args:
        n: number of scenes.
        image_size: height and width in pixels.
        generator: source of all randomness.

    Returns:
        ``image`` (n, 3, S, S) in [-1, 1]: albedo (plain object colours, a checkered ground, a striped wall)
        times Lambertian shading from a random light, plus Gaussian noise; ``depth`` (n, 1, S, S): distance
        along the view axis in metres; ``normals`` (n, 3, S, S): unit normals in camera coordinates (x right,
        y up, z along the view axis; every visible normal faces the camera); ``kind`` (n, S, S): 0 wall,
        1 ground, 2 sphere, 3 box; ``edges`` (n, 1, S, S): 1 on the first pixel (in raster order) of every
        horizontally or vertically adjacent pair that shows different surfaces, i.e. semantic boundaries and
        occlusion boundaries (depth jumps), 1 pixel thick.
    """
    p = _draw_parameters(n, generator)
    noise = _draw_noise(n, image_size, generator)  # the last draw: nothing below touches the generator
    height, pitch, wall, radius, half, colour = (p[k] for k in ("height", "pitch", "wall", "radius", "half", "colour"))
    elevation, azimuth, is_sphere = p["elevation"], p["azimuth"], p["is_sphere"]
    light = torch.stack(
        (elevation.cos() * azimuth.sin(), elevation.sin(), -elevation.cos() * azimuth.cos()), dim=-1
    )
    wall_colour, ground_colour = p["wall_colour"], p["ground_colour"]
    is_box = ~is_sphere & p["present"]
    centre = torch.stack((p["lateral"], half[..., 1], p["depth_centre"]), dim=-1)

    # Unnormalised rays with unit z in camera space: the ray parameter t of a hit is its depth.
    coords = (torch.arange(image_size) + 0.5) / image_size * 2.0 - 1.0
    tan = math.tan(_FIELD_OF_VIEW / 2)
    v, u = torch.meshgrid(-coords * tan, coords * tan, indexing="ij")
    rays_cam = torch.stack((u, v, torch.ones_like(u)), dim=-1).reshape(-1, 3)
    rays = _rotate_pitch(rays_cam.expand(n, -1, -1), pitch)  # (n, P, 3) in the world
    origin = torch.stack((torch.zeros(n), height, torch.zeros(n)), dim=-1)

    inf = torch.tensor(math.inf)
    t_wall = wall[:, None] / rays[..., 2]
    t_ground = torch.where(rays[..., 1] < 0, -height[:, None] / rays[..., 1].clamp(max=-1e-12), inf)

    offset = origin[:, None, :] - centre  # (n, K, 3)
    a = (rays_cam**2).sum(-1)  # |ray|^2 is pitch-invariant: (P,)
    b = torch.einsum("nkc,npc->nkp", offset, rays)
    c = (offset**2).sum(-1) - radius**2
    disc = b**2 - a * c[..., None]
    t_sphere = (-b - disc.clamp(min=0).sqrt()) / a
    t_sphere = torch.where((disc > 0) & (t_sphere > 0) & is_sphere[..., None], t_sphere, inf)

    safe = torch.where(rays.abs() < 1e-12, torch.full_like(rays, 1e-12), rays)
    inverse = (1.0 / safe)[:, None]  # (n, 1, P, 3)
    t_low = (centre - half - origin[:, None])[:, :, None] * inverse
    t_high = (centre + half - origin[:, None])[:, :, None] * inverse
    t_near = torch.minimum(t_low, t_high).amax(-1)
    t_far = torch.maximum(t_low, t_high).amin(-1)
    t_box = torch.where((t_near <= t_far) & (t_near > 0) & is_box[..., None], t_near, inf)

    candidates = torch.cat((t_wall[:, None], t_ground[:, None], torch.minimum(t_sphere, t_box)), dim=1)
    depth, surface = candidates.min(dim=1)  # surface: 0 wall, 1 ground, 2 + k object k; (n, P)
    point = origin[:, None] + depth[..., None] * rays

    obj = (surface - 2).clamp(min=0)

    def pick(values: Tensor) -> Tensor:
        """The hit object's entry of per-object ``values`` (n, K, ...) for every pixel: (n, P, ...)."""
        index = obj.view(n, -1, *([1] * (values.dim() - 2)))
        return values.gather(1, index.expand(-1, -1, *values.shape[2:]))

    local = (point - pick(centre)) / pick(half)
    axis = local.abs().argmax(-1, keepdim=True)
    box_normal = torch.zeros_like(local).scatter(-1, axis, local.gather(-1, axis).sign())
    hit_sphere = pick(is_sphere)[..., None]
    object_normal = torch.where(hit_sphere, F.normalize(local, dim=-1), box_normal)
    normal = torch.where(
        (surface == 0)[..., None],
        torch.tensor([0.0, 0.0, -1.0]),
        torch.where((surface == 1)[..., None], torch.tensor([0.0, 1.0, 0.0]), object_normal),
    )
    kind = torch.where(surface < 2, surface, torch.where(hit_sphere[..., 0], 2, 3))

    checker = 0.7 + 0.3 * ((point[..., 0].floor() + point[..., 2].floor()) % 2)
    stripes = 0.9 + 0.1 * torch.sin(point[..., 1] * 4.0 * math.pi)
    albedo = torch.where(
        (surface == 0)[..., None],
        wall_colour[:, None] * stripes[..., None],
        torch.where((surface == 1)[..., None], ground_colour[:, None] * checker[..., None], pick(colour)),
    )
    lambert = (normal * light[:, None]).sum(-1, keepdim=True).clamp(min=0)
    rgb = albedo * (_AMBIENT + (1 - _AMBIENT) * lambert)
    rgb = (rgb + _NOISE_STD * noise).clamp(0, 1)

    grid = (n, image_size, image_size)
    surface = surface.view(grid)
    edges = torch.zeros(grid, dtype=torch.bool)
    edges[:, :, :-1] |= surface[:, :, :-1] != surface[:, :, 1:]
    edges[:, :-1, :] |= surface[:, :-1, :] != surface[:, 1:, :]

    def image_layout(x: Tensor) -> Tensor:
        return x.view(*grid, -1).permute(0, 3, 1, 2).contiguous()

    return {
        "image": image_layout(rgb * 2 - 1),
        "depth": image_layout(depth),
        "normals": image_layout(F.normalize(_rotate_pitch(normal, pitch, inverse=True), dim=-1)),
        "kind": kind.view(grid),
        "edges": edges.float()[:, None],
    }


class SyntheticScenesDataset(Dataset):
    """Rendered scenes (``render_scenes``, in chunks of 32 drawn one after the other from ``generator``) with
    the labels of ``tasks``: ``image`` ``(3, S, S)`` and per task ``semseg`` ``(S, S)`` long (the surface kind
    through ``CLASS_MAPS[num_classes]``), ``depth`` ``(1, S, S)``, ``normals`` ``(3, S, S)``, ``edges``
    ``(1, S, S)``.

    Scenes are rendered on demand, so memory does not grow with ``num_samples``: construction only advances
    ``generator`` past every chunk (``skip_scenes``: the parameter and noise draws, no rendering) and keeps the
    generator's state at the start of each chunk (5 KB a chunk). Item ``i`` renders the chunk holding it from its
    state, exactly the call that drew the chunk, so every sample is bit-for-bit what rendering the whole split
    at once gives. Rendered chunks stay in a least-recently-used cache of at most ``cache_bytes`` (the chunk
    in use is always kept): a sequential pass renders each chunk once, and a split that fits the budget is
    rendered once in all. ``__getitems__`` (a DataLoader's batch) takes the samples chunk by chunk, so a batch
    renders each of its chunks at most once. The cache is not pickled (DataLoader workers start empty).

    Args:
        num_samples: number of scenes.
        image_size: height and width in pixels.
        num_classes: a key of ``CLASS_MAPS``.
        tasks: names among ``DENSE_TASKS``, in batch order.
        generator: source of all randomness; left where rendering the whole split would leave it.
        cache_bytes: budget of the cache of rendered chunks.
    """

    def __init__(self, num_samples: int, image_size: int, num_classes: int, tasks: Sequence[str],
                 generator: torch.Generator, cache_bytes: int = CACHE_BYTES) -> None:
        check_positive(num_samples=num_samples, image_size=image_size)
        unknown = [t for t in tasks if t not in DENSE_TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose among {list(DENSE_TASKS)}")
        if num_classes not in CLASS_MAPS:
            raise ValueError(f"num_classes {num_classes} is not one of {sorted(CLASS_MAPS)}")
        self.num_samples, self.image_size, self.num_classes = num_samples, image_size, num_classes
        self.keys = ["image", *tasks]
        self.cache_bytes = cache_bytes
        self._device = generator.device
        self._states: list[Tensor] = []
        for start in range(0, num_samples, _RENDER_CHUNK):
            self._states.append(generator.get_state())
            skip_scenes(min(_RENDER_CHUNK, num_samples - start), image_size, generator)
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return self.num_samples

    def _render(self, chunk: int) -> dict[str, Tensor]:
        """The samples of ``chunk``, rendered from the generator state it was drawn from."""
        generator = torch.Generator(device=self._device)
        generator.set_state(self._states[chunk])
        start = chunk * _RENDER_CHUNK
        scenes = render_scenes(min(_RENDER_CHUNK, self.num_samples - start), self.image_size, generator)
        scenes["semseg"] = torch.tensor(CLASS_MAPS[self.num_classes])[scenes.pop("kind")]
        return {key: scenes[key] for key in self.keys}

    def _chunk(self, chunk: int) -> dict[str, Tensor]:
        """The samples of ``chunk``, from the cache or rendered (and cached, evicting the least recently used)."""
        if chunk in self._cache:
            self._cache.move_to_end(chunk)
            return self._cache[chunk]
        tensors = self._render(chunk)
        self._cache[chunk] = tensors
        self._cached_bytes += sum(t.nbytes for t in tensors.values())
        while len(self._cache) > 1 and self._cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= sum(t.nbytes for t in evicted.values())
        return tensors

    def _position(self, index: Any) -> int:
        i = operator.index(index)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} scenes")
        return i

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i = self._position(index)
        tensors = self._chunk(i // _RENDER_CHUNK)
        return {key: t[i % _RENDER_CHUNK].clone() for key, t in tensors.items()}  # no view keeps a chunk alive

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Tensor]]:
        """The samples of ``indices``, in that order (a DataLoader's batch), taken chunk by chunk so that each of
        their chunks is rendered at most once."""
        positions = [self._position(i) for i in indices]
        samples: list[dict[str, Tensor]] = [{} for _ in positions]
        for j in sorted(range(len(positions)), key=lambda j: positions[j] // _RENDER_CHUNK):
            samples[j] = self[positions[j]]
        return samples

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Every sample stacked, ``{key: (num_samples, ...)}``: renders the whole split, so memory grows with it
        (for inspection and tests; loaders index the dataset)."""
        chunks = [self._chunk(k) for k in range(len(self._states))]
        return {key: torch.cat([c[key] for c in chunks]) for key in self.keys}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_cached_bytes"] = OrderedDict(), 0
        return state


# ----------------------------------------------------------------------------------------------------------
# Learning-to-Branch regression tasks
# ----------------------------------------------------------------------------------------------------------


def _bent_identity(x: Tensor) -> Tensor:
    return (torch.sqrt(x * x + 1) - 1) / 2 + x


def _sinc(x: Tensor) -> Tensor:
    return torch.sinc(x / math.pi)  # torch.sinc is sin(pi x) / (pi x); this is sin(x) / x, 1 at 0


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sin": torch.sin,
    "square": torch.square,
    "bent": _bent_identity,
    "cos": torch.cos,
    "sinc": _sinc,
}


NOISE_SCALES = {"variance": (math.sqrt(10.0), math.sqrt(2.0)), "std": (10.0, 2.0)}
"""The factors on normal draws of ``B`` and ``delta`` for each reading of the paper's N(0, 10) and N(0, 2)."""
INPUT_DISTRIBUTIONS = ("normal", "uniform")


class RegressionTasks:
    """The task family ``T_{r,s} = act_r(m_r (B + delta_s) Z / phi)`` of Learning to Branch (section 4.1), fixed
    by a seed: the groups and task names, the matrices, and the standardisation of every target with the training
    split's mean and standard deviation (see ``datamodules.synthetic.SyntheticRegressionDataModule`` for the
    choices and their measurements).

    ``B`` (entries of variance 10) is shared by all tasks; each task has its own ``delta`` (variance 2); both are
    ``(output_dim, input_dim)``, drawn from the ``"parameters"`` stream. Inputs ``Z ~ N(0, I)`` of a split come
    from that split's stream.

    Args:
        activations: one activation name (``ACTIVATIONS``) per group.
        tasks_per_group: tasks per group, one number for all groups or one per group.
        input_dim: dimension of ``Z``.
        output_dim: dimension of each task's target.
        num_train: training samples (they define the standardisation).
        seed: seed of the matrices and of all inputs.
        scale_multipliers: one factor ``m_r`` per group on the activation's argument; defaults to 1 each.
        phi: the normalisation: a number, ``"input_dim"`` (the paper's words) or None for ``sqrt(3 * input_dim)``.
        noise_scale: how to read the paper's ``B ~ N(0, 10)`` and ``delta ~ N(0, 2)``: ``"variance"`` (entries
            of variance 10 and 2) or ``"std"`` (standard deviations 10 and 2). The same normal draws are scaled.
        input_distribution: ``Z``'s entries: ``"normal"`` (N(0, 1)) or ``"uniform"`` (on [-sqrt 3, sqrt 3]:
            variance 1 too); the paper does not say.
    """

    def __init__(self, activations: Sequence[str], tasks_per_group: int | Sequence[int], input_dim: int,
                 output_dim: int, num_train: int, seed: int, scale_multipliers: Sequence[float] | None = None,
                 phi: float | str | None = None, noise_scale: str = "variance",
                 input_distribution: str = "normal") -> None:
        acts = list(activations)
        unknown = [a for a in acts if a not in ACTIVATIONS]
        if unknown or not acts:
            raise ValueError(
                f"activations {acts} must be a non-empty list of names of {list(ACTIVATIONS)}; "
                f"unknown: {unknown}"
            )
        counts = [tasks_per_group] * len(acts) if isinstance(tasks_per_group, int) else list(tasks_per_group)
        if len(counts) != len(acts) or min(counts) < 1:
            raise ValueError(
                f"tasks_per_group {tasks_per_group} must be a positive int or one positive int per "
                f"activation ({len(acts)})"
            )
        multipliers = [1.0] * len(acts)
        if scale_multipliers is not None:
            multipliers = [float(m) for m in scale_multipliers]
        if len(multipliers) != len(acts) or not all(math.isfinite(m) and m > 0 for m in multipliers):
            raise ValueError(
                f"scale_multipliers {scale_multipliers} must be one positive number per activation "
                f"({len(acts)})"
            )
        check_positive(input_dim=input_dim, output_dim=output_dim)
        if noise_scale not in NOISE_SCALES:
            raise ValueError(f"noise_scale must be one of {list(NOISE_SCALES)}, got {noise_scale!r}")
        if input_distribution not in INPUT_DISTRIBUTIONS:
            raise ValueError(f"input_distribution must be one of {list(INPUT_DISTRIBUTIONS)}, got {input_distribution!r}")
        if isinstance(phi, str) and phi != "input_dim":
            raise ValueError(f"phi must be a positive number, 'input_dim' or omitted, got {phi!r}")
        self.phi = math.sqrt(3 * input_dim) if phi is None else float(input_dim if phi == "input_dim" else phi)
        if not (math.isfinite(self.phi) and self.phi > 0):
            raise ValueError(f"phi must be a positive finite number, got {phi}")
        self.noise_scale, self.input_distribution = noise_scale, input_distribution
        self.input_dim, self.output_dim, self.num_train, self.seed = input_dim, output_dim, num_train, seed
        self.activations, self.scale_multipliers = acts, multipliers

        unique = len(set(acts)) == len(acts)
        self.groups = [
            [f"{act}_{s}" if unique else f"{act}{group}_{s}" for s in range(count)]
            for group, (act, count) in enumerate(zip(acts, counts))
        ]
        self.task_names = [name for group in self.groups for name in group]

        g = stream_generator(seed, "parameters")
        base_scale, noise = NOISE_SCALES[noise_scale]
        base = base_scale * torch.randn(output_dim, input_dim, generator=g)
        self._mixing = [
            [base + noise * torch.randn(output_dim, input_dim, generator=g) for _ in group]
            for group in self.groups
        ]
        self._stats: tuple[Tensor, Tensor] | None = None

    def inputs(self, split: str, n: int) -> Tensor:
        """``n`` inputs ``(n, input_dim)`` of ``split``, from its stream."""
        g = stream_generator(self.seed, split)
        if self.input_distribution == "uniform":
            return (2.0 * torch.rand(n, self.input_dim, generator=g) - 1.0) * math.sqrt(3.0)
        return torch.randn(n, self.input_dim, generator=g)

    def correlations(self, num_samples: int = 20000) -> Tensor:
        """``(T, T)``: the Pearson correlation of two tasks' targets per output, averaged over the outputs, on
        ``num_samples`` inputs of the test split's stream (how related the family makes its tasks)."""
        targets = self._raw_targets(self.inputs("test", num_samples))  # (T, n, out)
        centred = targets - targets.mean(dim=1, keepdim=True)
        unit = centred / centred.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return torch.einsum("sno,tno->sto", unit, unit).mean(dim=-1)

    def correlation_summary(self, num_samples: int = 20000) -> dict[str, float]:
        """Mean target correlation within each group (``"bent"``) and between each pair of groups
        (``"bent-square"``); groups named by activation, with their multiplier when it is not 1."""
        corr = self.correlations(num_samples)
        names = [act if m == 1.0 else f"{act}x{m:g}" for act, m in zip(self.activations, self.scale_multipliers)]
        names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
        index, start = [], 0
        for group in self.groups:
            index.append(list(range(start, start + len(group))))
            start += len(group)
        out: dict[str, float] = {}
        for a, rows in enumerate(index):
            if len(rows) > 1:
                block = corr[rows][:, rows]
                out[names[a]] = float((block.sum() - block.diagonal().sum()) / (len(rows) * (len(rows) - 1)))
        for a in range(len(index)):
            for b in range(a + 1, len(index)):
                out[f"{names[a]}-{names[b]}"] = float(corr[index[a]][:, index[b]].mean())
        return out

    def _raw_targets(self, inputs: Tensor) -> Tensor:
        """Unstandardised targets of all tasks, ``(T, n, output_dim)``."""
        return torch.stack(
            [
                ACTIVATIONS[act](multiplier * inputs @ matrix.T / self.phi)
                for act, multiplier, matrices in zip(self.activations, self.scale_multipliers, self._mixing)
                for matrix in matrices
            ]
        )

    def targets(self, inputs: Tensor) -> dict[str, Tensor]:
        """Standardised targets of every task for given inputs.

        Args:
            inputs: ``(n, input_dim)``.

        Returns:
            Task name -> ``(n, output_dim)`` float32.
        """
        if self._stats is None:
            train = self._raw_targets(self.inputs("train", self.num_train))
            self._stats = (train.mean(dim=1, keepdim=True), train.std(dim=1, keepdim=True).clamp(min=1e-8))
        mean, std = self._stats
        standard = (self._raw_targets(inputs.float()) - mean) / std
        return dict(zip(self.task_names, standard.unbind(0)))


class SyntheticRegressionDataset(TensorDictDataset):
    """The samples of one split of a ``RegressionTasks`` family: ``image`` (the input, ``(input_dim,)``) and one
    standardised target ``(output_dim,)`` per task name.

    Args:
        tasks: the task family.
        split: ``"train"``, ``"val"`` or ``"test"`` (its input stream).
        num_samples: samples of the split.
    """

    def __init__(self, tasks: RegressionTasks, split: str, num_samples: int) -> None:
        inputs = tasks.inputs(split, num_samples)
        super().__init__({"image": inputs, **tasks.targets(inputs)})

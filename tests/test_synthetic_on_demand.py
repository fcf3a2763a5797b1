"""The synthetic scenes render each sample on demand: the same data as rendering a split whole, memory that does
not grow with the split, and a dataset that pickles (for DataLoader workers) without its cache."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from datamodules.datasets import synthetic
from datamodules.datasets.synthetic import (
    CLASS_MAPS,
    DENSE_TASKS,
    SyntheticScenesDataset,
    render_scenes,
    skip_scenes,
    stream_generator,
)

SIZE = 16
CHUNK = 32  # render_scenes' chunk: the reference draws the split in chunks of this size


def render_whole(num_samples: int, image_size: int, num_classes: int, tasks: list[str],
                 generator: torch.Generator) -> dict[str, Tensor]:
    """The split rendered at once, as the datasets of the published results were: chunks of 32 drawn one after
    the other from ``generator``, concatenated, the surface kind mapped to classes."""
    parts = [
        render_scenes(min(CHUNK, num_samples - start), image_size, generator)
        for start in range(0, num_samples, CHUNK)
    ]
    scenes = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    scenes["semseg"] = torch.tensor(CLASS_MAPS[num_classes])[scenes.pop("kind")]
    return {key: scenes[key] for key in ["image", *tasks]}


def assert_sample_equal(sample: dict[str, Tensor], reference: dict[str, Tensor], i: int) -> None:
    assert list(sample) == list(reference)
    for key, values in reference.items():
        assert sample[key].dtype == values.dtype and torch.equal(sample[key], values[i]), (i, key)


@pytest.mark.parametrize(
    ("num_samples", "image_size", "num_classes", "tasks", "seed", "split"),
    [
        (1, SIZE, 4, list(DENSE_TASKS), 0, "train"),
        (31, SIZE, 4, list(DENSE_TASKS), 3, "test"),
        (33, SIZE, 3, ["depth", "semseg"], 0, "val"),
        (70, 7, 2, ["edges", "normals", "semseg"], 1, "train"),  # 7x7: the noise draw is no multiple of 16
    ],
)
def test_every_sample_equals_the_whole_split_rendered_at_once(num_samples: int, image_size: int, num_classes: int,
                                                              tasks: list[str], seed: int, split: str) -> None:
    reference_generator, generator = stream_generator(seed, split), stream_generator(seed, split)
    reference = render_whole(num_samples, image_size, num_classes, tasks, reference_generator)
    data = SyntheticScenesDataset(num_samples, image_size, num_classes, tasks, generator, cache_bytes=0)
    assert torch.equal(generator.get_state(), reference_generator.get_state())  # left where rendering leaves it
    assert len(data) == num_samples
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    for i in order:  # random access through a one-chunk cache
        assert_sample_equal(data[i], reference, i)
    assert_sample_equal(data[-1], reference, num_samples - 1)
    with pytest.raises(IndexError):
        data[num_samples]
    batches = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    seen = 0
    for batch_index, batch in zip(DataLoader(range(num_samples), batch_size=8, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed)), batches):
        for key, values in reference.items():
            assert torch.equal(batch[key], values[batch_index]), key
        seen += len(batch_index)
    assert seen == num_samples
    assert all(torch.equal(data.tensors[key], reference[key]) for key in reference)


def test_skip_scenes_advances_the_generator_as_rendering_does() -> None:
    for n, size in [(1, 16), (32, 7), (5, 32)]:
        rendered, skipped = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        render_scenes(n, size, rendered)
        skip_scenes(n, size, skipped)
        assert torch.equal(rendered.get_state(), skipped.get_state())


def tensor_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of the tensor storages reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj), seen)
    return 0


def test_memory_does_not_grow_with_the_split() -> None:
    chunk_bytes = CHUNK * (3 + 3 + 1 + 1) * SIZE * SIZE * 4 + CHUNK * SIZE * SIZE * 8  # four tasks, semseg long
    held = {}
    for n in (160, 1280):
        data = SyntheticScenesDataset(n, SIZE, 4, list(DENSE_TASKS), stream_generator(0, "test"),
                                      cache_bytes=2 * chunk_bytes)
        for _ in DataLoader(data, batch_size=32):
            pass
        assert tensor_bytes(data._cache) == 2 * chunk_bytes  # rendered scenes: the budget, whatever the split
        held[n] = tensor_bytes(data)
        assert held[n] < 2 * chunk_bytes + n // CHUNK * 6000  # and one generator state (5 KB) a chunk
    assert held[1280] - held[160] < (1280 - 160) // CHUNK * 6000
    assert held[1280] < 1280 * chunk_bytes // CHUNK / 10  # under a tenth of the split rendered whole


def test_sequential_pass_renders_each_chunk_once_and_a_split_within_budget_renders_once(monkeypatch) -> None:
    calls: list[int] = []
    render = SyntheticScenesDataset._render
    monkeypatch.setattr(SyntheticScenesDataset, "_render", lambda self, chunk: calls.append(chunk) or render(self, chunk))
    data = SyntheticScenesDataset(100, 8, 4, ["depth", "semseg"], stream_generator(0, "val"), cache_bytes=0)
    for _ in DataLoader(data, batch_size=6):  # batches that straddle chunks
        pass
    assert calls == [0, 1, 2, 3]
    calls.clear()
    data = SyntheticScenesDataset(100, 8, 4, ["depth", "semseg"], stream_generator(0, "val"), cache_bytes=0)
    samples = data.__getitems__([5, 40, 7, 41, 99, 6])  # a shuffled batch: each of its chunks once
    assert sorted(calls) == [0, 1, 3]
    assert [torch.equal(s["depth"], data[i]["depth"]) for s, i in zip(samples, [5, 40, 7, 41, 99, 6])] == [True] * 6
    calls.clear()
    within = SyntheticScenesDataset(100, 8, 4, ["depth", "semseg"], stream_generator(0, "val"))
    for epoch in range(2):
        for _ in DataLoader(within, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            pass
    assert sorted(calls) == [0, 1, 2, 3]
    assert synthetic.CACHE_BYTES >= 512 * (3 + 1 + 3) * 32 * 32 * 4 + 512 * 32 * 32 * 8  # so does the quickstart's


def test_pickle_round_trip_drops_the_cache_and_keeps_the_data() -> None:
    data = SyntheticScenesDataset(40, SIZE, 3, ["semseg", "normals"], stream_generator(2, "train"))
    expected = [data[i] for i in range(40)]  # fills the cache
    assert data._cache
    blob = pickle.dumps(data)
    assert len(blob) < 2 * 5056 + 4000  # two generator states and the settings, no rendered scene
    copy = pickle.loads(blob)
    assert len(copy) == 40 and not copy._cache
    for i in (39, 0, 33):
        assert_sample_equal(copy[i], {key: torch.stack([s[key] for s in expected]) for key in expected[0]}, i)
    loader = DataLoader(Subset(copy, [3, 35, 1]), batch_size=3, num_workers=1, multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert torch.equal(batch["normals"], torch.stack([expected[i]["normals"] for i in (3, 35, 1)]))

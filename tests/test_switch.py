"""The specialisation cache: a switch to a preference equals ``model.specialize`` bit for bit."""

import pytest
import torch
from torch import nn

from dymu.backbones import ConvEncoderDecoder
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference, evaluation_preferences
from dymu.switch import SpecializationCache
from dymu.tasks import make_task


def random_model(bn_statistics="running", seed=0):
    torch.manual_seed(seed)
    tasks = [make_task("semseg", out_channels=4), make_task("depth"), make_task("normals")]
    model = DynamicMultiTaskModel.build(ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8),
                                        tasks, edge={"embed_dim": 8, "hidden": 16},
                                        weight={"embed_dim": 8, "hidden": 16, "bn_statistics": bn_statistics})
    # the hypernets' heads start at zero (one tree, no shifts): random ones give many trees and real shifts
    for head in [*model.edge_hypernet.heads, *model.weight_hypernet.heads]:
        nn.init.normal_(head.weight, std=1.0)
        nn.init.normal_(head.bias, std=0.3)
    for m in model.anchor.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("bn_statistics", ["running", "batch"])
def test_cache_equals_specialize(bn_statistics):
    model = random_model(bn_statistics)
    cache = SpecializationCache(model)
    x = torch.randn(3, 3, 16, 16)
    prefs = evaluation_preferences(3, 12, c=0.0, seed=1) + evaluation_preferences(3, 12, c=1.0, seed=1)
    prefs = prefs + prefs[::-1]  # every tree revisited, with other shifts in between
    trees = {model.architecture(p) for p in prefs}
    assert len(trees) > 1
    for pref in prefs:
        with torch.no_grad():
            expected = model.specialize(pref)(x)
            got = cache(pref)(x)
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    assert len(cache) == len(trees)
    assert cache.misses == len(trees) and cache.hits == len(prefs) - len(trees)


def test_same_tree_gives_the_same_module_with_its_own_shifts():
    model = random_model()
    cache = SpecializationCache(model)
    prefs = evaluation_preferences(3, 30, c=0.0, seed=2)
    by_tree = {}
    for p in prefs:
        by_tree.setdefault(model.architecture(p), []).append(p)
    p, q = next(v for v in by_tree.values() if len(v) >= 2)[:2]
    net_p = cache(p)
    weights_p = [b.weight.clone() for b in net_p.modules() if isinstance(b, nn.BatchNorm2d)]
    net_q = cache(q)
    assert net_q is net_p
    weights_q = [b.weight for b in net_q.modules() if isinstance(b, nn.BatchNorm2d)]
    assert any(not torch.equal(a, b) for a, b in zip(weights_p, weights_q))


def test_max_trees_drops_the_least_recently_used():
    model = random_model()
    cache = SpecializationCache(model, max_trees=1)
    prefs = [Preference.uniform(3, 0.0), Preference.uniform(3, 1.0)]
    assert model.architecture(prefs[0]) != model.architecture(prefs[1])
    cache(prefs[0])
    cache(prefs[1])
    cache(prefs[0])
    assert len(cache) == 1 and cache.misses == 3
    with pytest.raises(ValueError, match="max_trees"):
        SpecializationCache(model, max_trees=0)


def test_bake_bn_deltas_with_some_deltas_only():
    model = random_model()
    anchor = model.anchor
    arch = model.architecture(Preference.uniform(3, 0.0))
    names = list(model.weight_hypernet.bn_names)
    gen = torch.Generator().manual_seed(5)
    some = {n: (torch.randn(anchor.get_submodule(n).num_features, generator=gen),
                torch.randn(anchor.get_submodule(n).num_features, generator=gen)) for n in names[::3]}
    spec = anchor.specialize(arch, some)
    copies = anchor.batchnorm_copies(spec.blocks)
    for name, source, target in zip(copies.names, copies.sources[::2], copies.targets[::2]):
        expected = source + some[name][0] if name in some else source
        assert torch.equal(target, expected), name
    assert any(n in some for n in copies.names) and any(n not in some for n in copies.names)


def test_specialize_refuses_unknown_batchnorm_names():
    model = random_model()
    with pytest.raises(KeyError, match="not BatchNorms"):
        model.anchor.specialize(model.architecture(Preference.uniform(3, 0.0)),
                                {"streams.0.0.nope": (torch.zeros(4), torch.zeros(4))})

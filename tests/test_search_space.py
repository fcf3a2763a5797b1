import pytest
import torch

from dymu.search_space import Architecture


def test_used_nodes_hand_example():
    # 3 tasks, 3 layers. Heads: tasks 0,1 -> node 0, task 2 -> node 2 (layer 2).
    # layer 2 nodes {0, 2} pick parents: node 0 <- 1, node 2 <- 1 (node 1's choice is irrelevant).
    # layer 1 node {1} picks parent 0 (nodes 0 and 2 of layer 1 are unused: their choices do not count).
    arch = Architecture(((2, 0, 1), (1, 0, 1), (0, 0, 2)))
    assert arch.used_nodes() == [frozenset({0}), frozenset({1}), frozenset({0, 2})]
    assert arch.num_used_nodes() == 4
    assert arch.path(0) == [0, 1, 0]
    assert arch.path(2) == [0, 1, 2]


def test_anchor_and_shared():
    anchor = Architecture.anchor(4, 3)
    assert anchor.used_nodes() == [frozenset(range(4))] * 3
    assert all(anchor.path(t) == [t, t, t] for t in range(4))
    shared = Architecture.shared(4, 3, stream=2)
    assert shared.used_nodes() == [frozenset({2})] * 3


def test_from_logits_and_one_hot_roundtrip():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 4, generator=gen)
    arch = Architecture.from_logits(logits)
    assert arch.to_list() == logits.argmax(-1).tolist()
    assert Architecture.from_logits(arch.one_hot()) == arch


@pytest.mark.parametrize("parents, message", [
    (((0, 1), (0,)), "layer 1 has 1 parent choices, expected 2"),
    (((0, 2),), r"parent indices \[2\] outside 0..1"),
    ((), "at least one layer"),
])
def test_invalid_architectures(parents, message):
    with pytest.raises(ValueError, match=message):
        Architecture(parents)

"""Regularizer terms against brute-force enumeration and naive re-implementations."""

import itertools

import pytest
import torch

from dymu.regularizer import active_loss, inactive_loss, omega, usage_probabilities
from dymu.search_space import Architecture

N, L = 3, 2


def all_architectures(n, layers):
    rows = list(itertools.product(range(n), repeat=n))
    for choice in itertools.product(rows, repeat=layers):
        yield Architecture(choice)


def test_usage_equals_used_nodes_for_every_hard_architecture():
    count = 0
    for arch in all_architectures(N, L):
        usage = usage_probabilities(arch.one_hot(torch.float64))
        assert torch.equal(usage[L], torch.ones(N, dtype=torch.float64))
        for k, nodes in enumerate(arch.used_nodes()):
            expected = torch.tensor([1.0 if i in nodes else 0.0 for i in range(N)], dtype=torch.float64)
            assert torch.equal(usage[k], expected), (arch, k)
        count += 1
    assert count == N ** (N * L)


def test_usage_of_last_block_layer_is_the_exact_marginal():
    # The heads choose independently, so P_use of the last block layer is exact: enumerate all head
    # choices and sum the probabilities of those that use each node.
    gen = torch.Generator().manual_seed(1)
    nu = torch.softmax(torch.randn(L, N, N, generator=gen, dtype=torch.float64), dim=-1)
    exact = torch.zeros(N, dtype=torch.float64)
    for heads in itertools.product(range(N), repeat=N):
        prob = torch.prod(torch.stack([nu[L - 1, j, heads[j]] for j in range(N)]))
        for i in set(heads):
            exact[i] += prob
    torch.testing.assert_close(usage_probabilities(nu)[L - 1], exact)


def test_usage_lower_layer_follows_the_recursion_by_hand():
    nu = torch.tensor([
        [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]],
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
    ], dtype=torch.float64)
    usage = usage_probabilities(nu)
    assert usage[1].tolist() == [1.0, 0.0, 1.0]
    # layer 0: node 0 used by child 0 (p .5) or child 2 (p .2): 1 - .5 * .8 = .6; node 1 by child 0: .5;
    # node 2 by child 2: .8 (child 1 is unused, so its choice of node 1 does not count).
    torch.testing.assert_close(usage[0], torch.tensor([0.6, 0.5, 0.8], dtype=torch.float64))


def naive_active(nu, usage, active, aff):
    layers, n = nu.shape[0], nu.shape[1]
    total = 0.0
    for k in range(layers):
        weight = (layers - (k + 1)) / layers  # the paper's (L - l) / L, l = k + 1 (docs/method.md)
        for i in range(n):
            for j in range(n):
                if i != j and active[i] and active[j]:
                    dist = float(((nu[k, i] - nu[k, j]) ** 2).sum())
                    total += weight * float(aff[i, j]) * float(usage[k + 1, i]) * float(usage[k + 1, j]) * dist
    return total


def naive_inactive(nu, active):
    total = 0.0
    act = [i for i in range(nu.shape[1]) if active[i]]
    ina = [j for j in range(nu.shape[1]) if not active[j]]
    if not act or not ina:
        return 0.0
    for k in range(nu.shape[0]):
        for j in ina:
            total += min(float(((nu[k, i] - nu[k, j]) ** 2).sum()) for i in act)
    return total


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n, layers", [(3, 2), (4, 3)])
def test_active_and_inactive_losses_match_naive_sums(seed, n, layers):
    gen = torch.Generator().manual_seed(seed)
    nu = torch.softmax(torch.randn(layers, n, n, generator=gen, dtype=torch.float64) * 2, dim=-1)
    aff = torch.rand(n, n, generator=gen, dtype=torch.float64)
    active = torch.rand(n, generator=gen) > 0.4
    usage = usage_probabilities(nu)
    assert active_loss(nu, usage, active, aff).item() == pytest.approx(naive_active(nu, usage, active, aff))
    assert inactive_loss(nu, active).item() == pytest.approx(naive_inactive(nu, active))


def test_active_loss_hand_value():
    # L = 2: only layer k = 0 counts, with weight (2 - 1) / 2 = 0.5. Heads pick nodes 0 and 1 -> both
    # used at layer 1. Tasks 0 and 1 pick different parents at layer 0: ||e0 - e1||^2 = 2.
    nu = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    aff = torch.tensor([[1.0, 0.3], [0.7, 1.0]], dtype=torch.float64)
    terms = omega(nu, torch.tensor([0.5, 0.5]), c=1.0, affinity=aff, tau=0.2, lambda_active=1.0,
                  lambda_inactive=0.1)
    # ordered pairs (0,1) and (1,0): 0.5 * (0.3 + 0.7) * 1 * 1 * 2 = 1.0
    assert terms["active"].item() == pytest.approx(1.0)
    assert terms["inactive"].item() == 0.0
    assert terms["omega"].item() == pytest.approx(1.0)
    # c scales only the active term
    assert omega(nu, torch.tensor([0.5, 0.5]), 0.25, aff, 0.2, 1.0, 0.1)["omega"].item() == pytest.approx(0.25)


def test_inactive_loss_hand_value_and_empty_sets():
    nu = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]], dtype=torch.float64)
    r = torch.tensor([0.45, 0.45, 0.1])
    terms = omega(nu, r, 0.0, torch.ones(3, 3), tau=0.2, lambda_active=1.0, lambda_inactive=0.1)
    # task 2 inactive; distance to task 0: .25 + .25 = .5, to task 1: .5 -> min .5
    assert terms["inactive"].item() == pytest.approx(0.5)
    assert terms["omega"].item() == pytest.approx(0.05)
    assert inactive_loss(nu, torch.tensor([True, True, True])).item() == 0.0
    assert inactive_loss(nu, torch.tensor([False, False, False])).item() == 0.0


def test_regularizer_gradients_reach_the_samples():
    logits = torch.randn(2, 3, 3, requires_grad=True)
    nu = torch.softmax(logits, dim=-1)
    out = omega(nu, torch.tensor([0.4, 0.4, 0.2]), 1.0, torch.ones(3, 3), 0.3, 1.0, 0.1)
    out["omega"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0

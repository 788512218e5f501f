"""SWP training hooks by their defining properties (METHODS.md 2.7 S3, S4) and the conversion to
stripe convolutions (== the trained model)."""

from __future__ import annotations

import torch
from torch import nn

import surgery
from surgery.layers import StripeConv
from surgery.train.swp import (
    SkeletonHook, add_skeletons, apply_threshold, channel_groups, choose_threshold, dead_channels, prune_dead_filters,
    skeletons, stripe_counts, to_stripes, zero_dead,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 3))


def test_skeletons_start_at_one_and_leave_the_function_and_the_users_model_alone():
    net = _net().eval()
    sk = add_skeletons(net)
    assert set(skeletons(sk)) == {"0", "3"} and not skeletons(net)
    assert all(bool((s.fs == 1).all()) and s.fs.shape == (m.out_channels, 3, 3)
               for (n, s), m in zip(skeletons(sk).items(), (sk[0], sk[3])))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(sk(x), net(x), atol=1e-6)


def test_l1_step_is_exact_with_zero_data_gradient():
    """S4: zero CE gradient, no momentum, weight decay w: FS <- FS - lr (alpha sign(FS) + w FS)."""
    sk = add_skeletons(_net()).double()
    fs = skeletons(sk)["0"].fs
    with torch.no_grad():
        fs.copy_(torch.randn_like(fs))
    before = fs.detach().clone()
    lr, alpha, wd = 0.1, 0.01, 1e-3
    opt = torch.optim.SGD([fs], lr=lr, weight_decay=wd)
    hook = SkeletonHook(sk, alpha=alpha, delta=0.0, optimizer=opt)
    opt.zero_grad()
    (sk(torch.randn(2, 3, 8, 8, dtype=torch.float64)) * 0).sum().backward()
    hook.after_backward(sk)
    opt.step()
    assert torch.allclose(fs.detach(), before - lr * (alpha * torch.sign(before) + wd * before), rtol=0, atol=1e-15)


def test_masked_entries_are_zero_with_zero_momentum_after_every_step():
    """S3 (with the momentum fix): after each step every |FS| <= delta is exactly 0 and its momentum
    is 0, so it cannot come back on its own."""
    sk = add_skeletons(_net())
    with torch.no_grad():
        for s in skeletons(sk).values():
            s.fs.uniform_(0.5, 1.5)  # spread, so some stripes fall below delta and others stay
    opt = torch.optim.SGD(sk.parameters(), lr=0.1, momentum=0.9)
    hook = SkeletonHook(sk, alpha=0.01, delta=0.9, optimizer=opt)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    sk.train()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(sk(x), y).backward()
        hook.after_backward(sk)
        opt.step()
        hook.after_step(sk)
        for s in skeletons(sk).values():
            dead = s.fs == 0
            assert bool((s.fs[~dead].abs() > 0.9).all())
            assert bool((opt.state[s.fs]["momentum_buffer"][dead] == 0).all())
    live, total = stripe_counts(sk)["0"]
    assert 0 < live < total


def test_stripe_conversion_computes_what_the_trained_model_computes(tmp_path):
    sk = add_skeletons(_net()).eval()
    with torch.no_grad():
        for s in skeletons(sk).values():
            s.fs.copy_(torch.randn_like(s.fs) * (torch.rand_like(s.fs) > 0.5))
    stripes = to_stripes(sk)
    assert isinstance(stripes[0], StripeConv) and isinstance(stripes[3], StripeConv)
    assert stripes[0].n_stripes == int((skeletons(sk)["0"].fs != 0).sum())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(stripes(x), sk(x), atol=1e-5)
    base = surgery.stats(_net(), x).macs
    assert surgery.stats(stripes, x).macs < base
    surgery.save(stripes, tmp_path / "s.pt", example_inputs=x)
    with torch.no_grad():
        assert torch.equal(surgery.load(tmp_path / "s.pt")(x), stripes(x))


def _dead_skeleton():
    """A skeleton net where filters 1 and 4 of the first conv and filter 5 of the second lost every
    stripe (filter 2 of the first conv keeps two of its three rows), BN statistics spread."""
    net = _net()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_mean.uniform_(-0.5, 0.5)
    sk = add_skeletons(net.eval())
    with torch.no_grad():
        fs = skeletons(sk)["0"].fs
        fs[[1, 4]] = 0
        fs[2, 0] = 0
        skeletons(sk)["3"].fs[5] = 0
    return sk


def test_dead_channels_are_the_filters_with_no_live_stripe_and_their_bn_is_zeroed():
    sk = _dead_skeleton()
    groups = channel_groups(sk, torch.randn(1, 3, 8, 8))
    assert [(g.size, [w[0] for w in g.writers], sorted({z[:2] for z in g.zeroed})) for g in groups] == \
        [(8, ["0"], [("1", "bias"), ("1", "weight")]), (6, ["3"], [])]
    assert dead_channels(sk, groups) == {groups[0].id: [1, 4], groups[1].id: [5]}
    zero_dead(sk, groups)
    assert sk[1].weight[[1, 4]].tolist() == [0, 0] and sk[1].bias[[1, 4]].tolist() == [0, 0]
    assert bool((sk[1].weight[[0, 2, 3, 5, 6, 7]] != 0).all())


def test_hook_keeps_the_bn_of_a_dead_filter_at_zero_through_training():
    sk = add_skeletons(_net())
    groups = channel_groups(sk, torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        skeletons(sk)["0"].fs[3].fill_(0.05)  # filter 3 dies at the first step
    opt = torch.optim.SGD(sk.parameters(), lr=0.1, momentum=0.9)
    hook = SkeletonHook(sk, alpha=0.01, delta=0.1, optimizer=opt, groups=groups)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    sk.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(sk(x), y).backward()
        hook.after_backward(sk)
        opt.step()
        hook.after_step(sk)
        assert sk[1].weight[3] == 0 and sk[1].bias[3] == 0
        assert opt.state[sk[1].weight]["momentum_buffer"][3] == 0
    with torch.no_grad():
        assert bool((sk[:3](x)[:, 3] == 0).all())  # the channel is exactly zero after BN and ReLU


def test_dead_filters_are_pruned_as_channels_through_the_pipeline():
    sk = _dead_skeleton()
    x = torch.randn(4, 3, 8, 8)
    zero_dead(sk, channel_groups(sk, x))
    pruned, plan = prune_dead_filters(sk, x)
    masked, _ = prune_dead_filters(sk, x, mode="mask")
    assert [g.keep for g in plan.groups] == [(0, 2, 3, 5, 6, 7), (0, 1, 2, 3, 4)] and plan.method == "swp"
    assert (pruned[0].out_channels, pruned[1].num_features, pruned[3].in_channels, pruned[3].out_channels,
            pruned[7].in_features) == (6, 6, 6, 5, 5)
    with torch.no_grad():
        ref = sk(x)
        assert torch.allclose(pruned(x), masked(x), rtol=0, atol=1e-6 * ref.abs().max())  # pruned == masked
        assert torch.allclose(pruned(x), ref, rtol=0, atol=1e-6 * ref.abs().max())  # the dead filters gave nothing
    stripes = to_stripes(sk, x)
    assert isinstance(stripes[0], StripeConv) and (stripes[0].out_channels, stripes[0].n_stripes) == (6, 6 * 9 - 3)
    assert (stripes[3].in_channels, stripes[3].out_channels, stripes[3].n_stripes) == (6, 5, 45)
    with torch.no_grad():
        assert torch.allclose(stripes(x), ref, rtol=0, atol=1e-5 * ref.abs().max())
    # MACs by stripes: C_in x live stripes x output positions, plus the linear
    assert surgery.stats(stripes, x[:1]).macs == 3 * 51 * 8 * 8 + 6 * 45 * 4 * 4 + 5 * 3


def test_threshold_for_a_macs_target_is_the_smallest_that_meets_it():
    sk = add_skeletons(_net())
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        for s in skeletons(sk).values():
            s.fs.uniform_(0.0, 1.0)
    groups = channel_groups(sk, x)
    base = surgery.stats(_net(), x).macs
    d = choose_threshold(sk, x, 0.5, 0.0, groups)

    def macs(t):
        return surgery.stats(to_stripes(apply_threshold(sk, t, groups), x), x).macs

    below = max(float(v) for s in skeletons(sk).values() for v in s.fs.detach().flatten() if v < d)
    assert macs(d) <= 0.5 * base < macs(below)

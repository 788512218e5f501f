"""SWP training hooks by their defining properties (METHODS.md 2.7 S3, S4) and the conversion to
stripe convolutions (== the trained model)."""

from __future__ import annotations

import torch
from torch import nn

import surgery
from surgery.layers import StripeConv
from surgery.train.swp import SkeletonHook, add_skeletons, skeletons, stripe_counts, to_stripes


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

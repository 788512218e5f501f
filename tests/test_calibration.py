"""Calibration data in every form the API and the CLI accept, and the recorder's guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import surgery
from surgery.calibration import Calibration, load_data, record
from surgery.calibration.data import DataError


def _shapes(cal):
    return [(tuple(x[0].shape), None if y is None else tuple(y.shape)) for x, y in cal]


def test_api_forms_give_the_same_batches():
    x, y = torch.randn(10, 3, 4, 4), torch.arange(10) % 3
    assert _shapes(Calibration(x, batch_size=4)) == [((4, 3, 4, 4), None), ((4, 3, 4, 4), None), ((2, 3, 4, 4), None)]
    assert _shapes(Calibration((x, y), batch_size=5)) == [((5, 3, 4, 4), (5,))] * 2
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    assert _shapes(Calibration(loader)) == [((5, 3, 4, 4), (5,))] * 2
    assert _shapes(Calibration([x[:2], x[2:]])) == [((2, 3, 4, 4), None), ((8, 3, 4, 4), None)]
    assert len(list(Calibration(loader, max_batches=1))) == 1
    again = Calibration(Calibration((x, y), batch_size=5), max_batches=1)  # re-wrapping keeps the batch size
    assert _shapes(again) == [((5, 3, 4, 4), (5,))]


@pytest.mark.parametrize("bad, msg", [
    ("digits", "data must be a tensor"),
    ({"x": 1}, "data must be a tensor"),
    ([1, 2], "a calibration batch must be a tensor"),
    ([], "holds no batch"),
])
def test_bad_api_data_is_one_clear_error(bad, msg):
    with pytest.raises(DataError, match=msg):
        list(Calibration(bad))


def test_files_and_builtin_sets(tmp_path):
    x = np.random.rand(6, 1, 8, 8).astype(np.float32)
    y = np.arange(6)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    xs, ys = load_data(str(tmp_path / "d.npz"), (1, 1, 8, 8))
    assert torch.equal(xs, torch.from_numpy(x)) and ys.tolist() == list(range(6)) and ys.dtype == torch.long
    torch.save({"x": torch.from_numpy(x)}, tmp_path / "d.pt")
    xs, ys = load_data(str(tmp_path / "d.pt"), (1, 1, 8, 8))
    assert ys is None and xs.shape == (6, 1, 8, 8)
    dx, dy = load_data("digits", (1, 3, 12, 12))
    assert dx.shape == (1797, 3, 12, 12) and dy.shape == (1797,) and abs(float(dx.mean())) < 1e-4


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y = load_data(str(tmp_path), (1, 3, 16, 16))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1] and 0 <= float(x.min()) and float(x.max()) <= 1
    gx, _ = load_data(str(tmp_path), (1, 1, 16, 16))
    assert gx.shape == (6, 1, 16, 16)


@pytest.mark.parametrize("content, msg", [
    (b"not a zip", "cannot read data"),
])
def test_corrupt_files_are_one_clear_error(tmp_path, content, msg):
    (tmp_path / "bad.npz").write_bytes(content)
    with pytest.raises(DataError, match=msg):
        load_data(str(tmp_path / "bad.npz"), (1, 1, 8, 8))
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(DataError, match="must hold an array 'x'"):
        load_data(str(tmp_path / "nox.npz"), (1, 1, 8, 8))
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((3, 2)), y=np.arange(4))
    with pytest.raises(DataError, match="x has 3 samples but y has 4"):
        load_data(str(tmp_path / "mismatch.npz"), (1, 2))
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "nope.npz"), (1, 2))
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_data(str(tmp_path / "d.csv"), (1, 2))


def test_recorder_streams_activations_and_gradients_without_touching_the_model():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).train()
    x, y = torch.randn(10, 1, 8, 8), torch.arange(10) % 3
    graph = surgery.trace(net, x[:1])
    relu = next(n.name for n in graph.fx_graph.nodes if n.op == "call_module" and n.target == "2")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def visit(acts, grads, labels):
        a, g = acts[relu], grads[relu]
        seen.append((a.shape[0], g.shape == a.shape, labels.tolist()))

    n = record(graph, Calibration((x, y), batch_size=4), [relu], visit, grad=True)
    assert n == 3 and [s[0] for s in seen] == [4, 4, 2] and all(s[1] for s in seen)
    assert all(p.grad is None for p in net.parameters())  # gradients w.r.t. activations only
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # BN statistics untouched
    assert net.training  # the user's mode is restored
    with torch.no_grad():  # the activations are the model's own (eval mode)
        ref = net.eval()[:3](x[:4])
    out = {}
    record(graph, Calibration(x[:4]), [relu], lambda a, g, l: out.update(a))
    assert torch.allclose(out[relu], ref)


def test_exact_batches_for_a_shape_locked_graph():
    x, y = torch.randn(10, 3), torch.arange(10)
    cal = Calibration((x, y), batch_size=4, exact_batch=3)
    got = [(xb[0].shape[0], yb.tolist()) for xb, yb in cal]
    assert got == [(3, [0, 1, 2]), (3, [4, 5, 6])]  # 4 -> 3 (+1 dropped), 4 -> 3, 2 -> dropped
    with pytest.raises(DataError, match="holds no batch"):
        list(Calibration(x[:2], exact_batch=3))

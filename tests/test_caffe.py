"""Caffe front end: prototxt + caffemodel -> fx GraphModule, checked against numpy references,
pruned through the CLI and the API (pruned == masked), saved and reloaded; bad inputs are one line."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.cli import app
from surgery.errors import ModelLoadError
from surgery.frontends.caffe import load_caffe
from surgery.layers import Affine

from caffe_nets import NETS, batch_norm, channel, conv, deconv, fc, pool, pool_size, relu, write_caffemodel
from helpers import check_pruned_equals_masked, n_params


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every test net as deploy.prototxt + net.caffemodel (blobs written with the reader's schema)."""
    root = tmp_path_factory.mktemp("caffe")
    out = {}
    for name, net in NETS.items():
        proto, weights = root / f"{name}.prototxt", root / f"{name}.caffemodel"
        proto.write_text(net.prototxt)
        write_caffemodel(weights, net.blobs(), v1=net.v1, legacy=net.legacy)
        out[name] = proto, weights
    return out


def _load(files, name: str) -> torch.fx.GraphModule:
    proto, weights = files[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer with parameters has its blobs: no random-init warning
        return surgery.load(str(proto), weights=str(weights))


@pytest.mark.parametrize("name", list(NETS))
def test_outputs_match_numpy_reference(files, name):
    net = NETS[name]
    gm = _load(files, name)
    assert isinstance(gm, torch.fx.GraphModule) and gm.meta["caffe"]["input_shapes"] == [list(net.input_shape)]
    x = np.random.default_rng(1).standard_normal(net.input_shape)
    with torch.no_grad():
        out = gm(torch.tensor(x, dtype=torch.float32)).double().numpy()
    ref = net.reference(x, net.blobs())
    assert out.shape == ref.shape
    assert rel(out, ref) < 1e-5


def test_module_names_and_folding(files):
    """Module names come from the layer names; a BatchNorm's Scale becomes its affine; TRAIN-phase,
    data, loss and accuracy layers are gone; in-place layers chain."""
    mobile = dict(_load(files, "mobilenet").named_modules())
    assert isinstance(mobile["conv1_dw"], torch.nn.Conv2d) and mobile["conv1_dw"].groups == 16
    bn = mobile["conv1_dw_bn"]
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.affine and "conv1_dw_scale" not in mobile
    assert isinstance(mobile["conv1_dw_relu"], torch.nn.LeakyReLU) and isinstance(mobile["conv1_prelu"], torch.nn.PReLU)
    alex = dict(_load(files, "alexnet").named_modules())
    assert not {"train_data", "loss", "accuracy", "drop6"} & set(alex)
    assert isinstance(alex["norm1"], torch.nn.LocalResponseNorm) and alex["conv2"].groups == 2
    misc = dict(_load(files, "misc").named_modules())
    assert not misc["bn1"].affine and isinstance(misc["scale1"], Affine) and isinstance(misc["up"], torch.nn.ConvTranspose2d)
    assert isinstance(dict(_load(files, "inception").named_modules())["inception_1x3"], torch.nn.Conv2d)


@pytest.mark.parametrize("name", list(NETS))
def test_prune_from_the_cli_equals_the_api(files, name, tmp_path):
    """``surgery prune deploy.prototxt --weights net.caffemodel --method l1 --ratio 0.5 --out p.pt``."""
    proto, weights = files[name]
    out = tmp_path / "p.pt"
    r = CliRunner().invoke(app, ["prune", str(proto), "--weights", str(weights), "--method", "l1", "--ratio", "0.5",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.stderr or r.stdout
    from_cli = surgery.load(out)
    model = _load(files, name)
    x = torch.randn(NETS[name].input_shape)
    plan, pruned, _ = check_pruned_equals_masked(model, x, method="l1", ratio=0.5)  # skips cross-channel groups
    assert plan.groups and n_params(pruned) < n_params(model)
    same = surgery.prune(model, x, method="l1", ratio=0.5)  # what the CLI runs (LRN groups pruned too)
    with torch.no_grad():
        assert torch.allclose(from_cli(x), same(x), rtol=1e-5, atol=1e-6)
    assert n_params(from_cli) == n_params(same) < n_params(model)
    # ... then ``surgery export p.pt --format onnx --out p.onnx``: onnxruntime computes what PyTorch computes
    ort = pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (pip install -e '.[onnx]')")
    onnx_file = tmp_path / "p.onnx"
    r = CliRunner().invoke(app, ["export", str(out), "--format", "onnx", "--out", str(onnx_file)])
    assert r.exit_code == 0, r.stderr or r.stdout
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert rel(got, from_cli(x).numpy()) < 1e-4


def test_checkpoint_reloads_affine_layers(files, tmp_path):
    """Standalone Scale/Bias are ``surgery.layers.Affine``: allow-listed, saved and reloaded without pickle,
    imported as they are and pruned (where fx traces into them and their parameters are sliced)."""
    model = _load(files, "misc")
    x = torch.randn(NETS["misc"].input_shape)
    pruned = surgery.prune(model, x, method="l1", ratio=0.5)
    assert pruned.get_parameter("scale1.weight").shape[0] < model.scale1.weight.shape[0]
    for name, net in (("imported", model), ("pruned", pruned)):
        surgery.save(net, tmp_path / f"{name}.pt")
        back = surgery.load(tmp_path / f"{name}.pt")
        with torch.no_grad():
            assert torch.equal(back(x), net(x)), name
    assert isinstance(surgery.load(tmp_path / "imported.pt").scale1, Affine)


def test_no_weights_initialises_randomly_with_a_warning(files):
    proto, _ = files["resnet"]
    with pytest.warns(UserWarning, match="no weights given; parameters are initialised randomly"):
        gm = load_caffe(proto)
    assert gm(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_surgery_load_still_loads_checkpoints(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    surgery.save(net, tmp_path / "n.pt")
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(surgery.load(tmp_path / "n.pt")(x), net(x))
    with pytest.raises(ModelLoadError, match=r"weights= applies to a Caffe \.prototxt only"):
        surgery.load(tmp_path / "n.pt", weights="x.caffemodel")


POOL = """
input: "data" input_shape {{ dim: 1 dim: 2 dim: {h} dim: {w} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param {{ pool: {method} kernel_h: {k} kernel_w: 2 stride_h: {s} stride_w: 1 pad_h: {p} pad_w: 1 round_mode: {mode} }} }}
"""


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("mode", ["CEIL", "FLOOR"])
def test_pooling_follows_caffe_sizes_and_divisors(tmp_path, method, mode):
    """Every small kernel/stride/pad: Caffe's output size, its clipped windows and AVE divisor (which
    counts padding but not the ceil overhang), or one error where PyTorch would size it differently."""
    rng = np.random.default_rng(5)
    proto, checked, refused = tmp_path / "pool.prototxt", 0, 0
    for h in (5, 6):
        for k in (2, 3, 4):
            for s in (1, 2, 3, 5):
                for p in (0, 1, 2):
                    if 2 * p > k:
                        continue
                    proto.write_text(POOL.format(h=h, w=h + 1, k=k, s=s, p=p, method=method, mode=mode))
                    x = rng.standard_normal((1, 2, h, h + 1))
                    ceil = mode == "CEIL"
                    torch_size = (h + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
                    torch_size -= ceil and (torch_size - 1) * s >= h + p
                    if torch_size != pool_size(h, k, s, p, ceil):
                        with pytest.raises(ModelLoadError, match=r"layer 'pool' \(Pooling\): Caffe pools .* this "
                                                                 r"kernel/stride/pad combination is not supported"):
                            load_caffe(proto)
                        refused += 1
                        continue
                    gm = load_caffe(proto)
                    ref = pool(x, (k, 2), (s, 1), (p, 1), method.lower(), ceil)
                    out = gm(torch.tensor(x, dtype=torch.float32)).double().numpy()
                    assert out.shape == ref.shape and rel(out, ref) < 1e-5, (h, k, s, p)
                    checked += 1
    assert checked > 30 and (refused > 0) == (mode == "CEIL"), (checked, refused)  # FLOOR sizes always agree


BN_READ_TWICE = """
input: "data" input_shape { dim: 1 dim: 4 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "sc" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "sc" top: "sc" }
layer { name: "sum" type: "Eltwise" bottom: "sc" bottom: "bn" top: "sum" }
"""


def test_scale_is_not_folded_when_the_unscaled_blob_is_read_again(tmp_path):
    rng = np.random.default_rng(3)
    blobs = {"conv": [rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6)],
             "bn": [rng.standard_normal(6), rng.uniform(1, 2, 6), np.array([2.0])],
             "sc": [rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)]}
    blobs = {k: [np.asarray(a, np.float32).astype(np.float64) for a in v] for k, v in blobs.items()}
    (tmp_path / "d.prototxt").write_text(BN_READ_TWICE)
    write_caffemodel(tmp_path / "w.caffemodel", blobs)
    gm = load_caffe(tmp_path / "d.prototxt", tmp_path / "w.caffemodel")
    assert isinstance(gm.sc, Affine) and not gm.bn.affine
    x = rng.standard_normal((1, 4, 6, 6))
    bn = batch_norm(conv(x, *blobs["conv"], pad=1), *blobs["bn"])
    ref = relu(bn * channel(blobs["sc"][0]) + channel(blobs["sc"][1])) + bn
    with torch.no_grad():
        assert rel(gm(torch.tensor(x, dtype=torch.float32)).double().numpy(), ref) < 1e-5


SE_BLOCK = """
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "norm" type: "LRN" bottom: "conv" top: "norm" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.4 beta: 0.75 } }
layer { name: "squeeze" type: "Pooling" bottom: "norm" top: "squeeze" pooling_param { pool: AVE global_pooling: true } }
layer { name: "down" type: "InnerProduct" bottom: "squeeze" top: "down" inner_product_param { num_output: 4 } }
layer { name: "down/relu" type: "ReLU" bottom: "down" top: "down" }
layer { name: "up" type: "InnerProduct" bottom: "down" top: "up" inner_product_param { num_output: 8 } }
layer { name: "gate" type: "Sigmoid" bottom: "up" top: "up" }
layer { name: "excite" type: "Scale" bottom: "norm" bottom: "up" top: "excite" scale_param { axis: 0 } }
layer { name: "out" type: "Convolution" bottom: "excite" top: "out" convolution_param { num_output: 6 kernel_size: 1 } }
"""


def test_se_block_with_two_bottom_scale_and_within_channel_lrn(tmp_path):
    """Squeeze-excitation as Caffe wrote it: a Scale whose gamma is the second bottom (axis 0, N x C
    against N x C x H x W), after a WITHIN_CHANNEL LRN (mean of squares over a 3x3 square)."""
    rng = np.random.default_rng(4)
    blobs = {"conv": [rng.standard_normal((8, 3, 3, 3)) / 5, rng.standard_normal(8) * 0.1],
             "down": [rng.standard_normal((4, 8)) / 3, rng.standard_normal(4) * 0.1],
             "up": [rng.standard_normal((8, 4)) / 2, rng.standard_normal(8) * 0.1],
             "out": [rng.standard_normal((6, 8, 1, 1)) / 3, rng.standard_normal(6) * 0.1]}
    blobs = {k: [np.asarray(a, np.float32).astype(np.float64) for a in v] for k, v in blobs.items()}
    (tmp_path / "se.prototxt").write_text(SE_BLOCK)
    write_caffemodel(tmp_path / "se.caffemodel", blobs)
    gm = load_caffe(tmp_path / "se.prototxt", tmp_path / "se.caffemodel")
    x = rng.standard_normal((1, 3, 8, 8))
    y = relu(conv(x, *blobs["conv"], pad=1))
    sq = np.pad(y ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    mean = sum(sq[:, :, i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9
    y = y / (1 + 0.4 * mean) ** 0.75
    gate = 1 / (1 + np.exp(-fc(relu(fc(y.mean(axis=(2, 3)), *blobs["down"])), *blobs["up"])))
    ref = conv(y * gate[:, :, None, None], *blobs["out"])
    with torch.no_grad():
        assert rel(gm(torch.tensor(x, dtype=torch.float32)).double().numpy(), ref) < 1e-5
    plan, pruned, _ = check_pruned_equals_masked(gm, torch.randn(1, 3, 8, 8), method="l1", ratio=0.5)
    assert pruned.get_submodule("conv").out_channels == 4 == pruned.get_submodule("up").out_features


FCN_HEAD = """
input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "score" type: "Convolution" bottom: "conv1" top: "score" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "upscore" type: "Deconvolution" bottom: "score" top: "upscore" convolution_param { num_output: 4 kernel_size: 4 stride: 2 bias_term: false } }
layer { name: "crop" type: "Crop" bottom: "upscore" bottom: "data" top: "out" crop_param { axis: 2 offset: 1 } }
"""


def test_fcn_head_with_deconvolution_and_crop(tmp_path):
    """FCN's upsampling head: a Deconvolution (18 x 18 here) cropped back to the input's 16 x 16 at offset 1."""
    rng = np.random.default_rng(6)
    blobs = {"conv1": [rng.standard_normal((8, 3, 3, 3)) / 5, rng.standard_normal(8) * 0.1],
             "score": [rng.standard_normal((6, 8, 1, 1)) / 3, rng.standard_normal(6) * 0.1],
             "upscore": [rng.standard_normal((6, 4, 4, 4)) / 5]}
    blobs = {k: [np.asarray(a, np.float32).astype(np.float64) for a in v] for k, v in blobs.items()}
    (tmp_path / "fcn.prototxt").write_text(FCN_HEAD)
    write_caffemodel(tmp_path / "fcn.caffemodel", blobs)
    gm = load_caffe(tmp_path / "fcn.prototxt", tmp_path / "fcn.caffemodel")
    x = rng.standard_normal((1, 3, 16, 16))
    y = conv(relu(conv(x, *blobs["conv1"], stride=2, pad=1)), *blobs["score"])
    ref = deconv(y, blobs["upscore"][0], stride=2)[:, :, 1:17, 1:17]
    with torch.no_grad():
        out = gm(torch.tensor(x, dtype=torch.float32)).double().numpy()
    assert out.shape == (1, 4, 16, 16) and rel(out, ref) < 1e-5
    plan, pruned, _ = check_pruned_equals_masked(gm, torch.randn(1, 3, 16, 16), method="l1", ratio=0.5)
    assert pruned.get_submodule("score").out_channels == 3 == pruned.get_submodule("upscore").in_channels


# -- bad input --------------------------------------------------------------------------------------
HEAD = 'input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
CONV = 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }\n'


def _expect(tmp_path, prototxt: str, pattern: str, blobs=None, raw: bytes | None = None):
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(prototxt)
    weights = None
    if blobs is not None or raw is not None:
        weights = tmp_path / "net.caffemodel"
        write_caffemodel(weights, blobs) if raw is None else weights.write_bytes(raw)
    with warnings.catch_warnings(), pytest.raises(ModelLoadError) as err:
        warnings.simplefilter("ignore")
        load_caffe(proto, weights)
    message = str(err.value)
    assert "\n" not in message and re.fullmatch(pattern.format(proto=re.escape(str(proto)), weights=re.escape(str(weights))), message), message


def test_unsupported_layer_names_the_layer_and_its_type(tmp_path):
    _expect(tmp_path, HEAD + CONV + 'layer { name: "py" type: "Python" bottom: "conv1" top: "py" '
            'python_param { module: "my_layers" layer: "Custom" } }',
            r"{proto}: layer 'py' has unsupported type 'Python' \(supported: AbsVal, BNLL, BatchNorm, .*\)")


def test_blob_count_and_shape_mismatches(tmp_path):
    rng = np.random.default_rng(0)
    _expect(tmp_path, HEAD + CONV, r"weights {weights}: layer 'conv1' \(Convolution\) has 1 blob\(s\), the prototxt "
            r"implies 2 \(\[4, 3, 3, 3\], \[4\]\)", blobs={"conv1": [rng.standard_normal((4, 3, 3, 3))]})
    _expect(tmp_path, HEAD + CONV, r"weights {weights}: layer 'conv1' \(Convolution\): blob 0 has shape \[4, 3, 5, 5\], "
            r"the prototxt implies \[4, 3, 3, 3\]", blobs={"conv1": [rng.standard_normal((4, 3, 5, 5)), np.zeros(4)]})


def test_other_bad_nets_are_one_line(tmp_path):
    _expect(tmp_path, HEAD + CONV.replace('bottom: "data"', 'bottom: "nothing"'),
            r"{proto}: layer 'conv1' \(Convolution\): reads blob 'nothing', which no earlier layer or input produces")
    _expect(tmp_path, CONV, r"{proto}: declares no input \(input:/input_shape or an Input layer\); .*")
    _expect(tmp_path, HEAD + "layer { name: 'x' type: 'ReLU' bottom: 'data' top: 'x' } }",
            r"{proto}: not a valid Caffe prototxt \(.*\)")
    _expect(tmp_path, HEAD + CONV + 'layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" '
            'pooling_param { pool: STOCHASTIC kernel_size: 2 } }',
            r"{proto}: layer 'pool' \(Pooling\): STOCHASTIC pooling is not supported \(MAX and AVE are\)")
    _expect(tmp_path, HEAD + CONV, r"weights {weights}: truncated or corrupt caffemodel \(.*\)", raw=b"\x0a\xff\xff\xff")


def test_cli_refuses_a_truncated_caffemodel_and_an_unknown_layer_in_one_line(files, tmp_path):
    proto, weights = files["alexnet"]
    truncated = tmp_path / "cut.caffemodel"
    truncated.write_bytes(weights.read_bytes()[:5000])
    unknown = tmp_path / "unknown.prototxt"
    unknown.write_text(HEAD + CONV + 'layer { name: "roi" type: "ROIPooling" bottom: "conv1" top: "roi" }')
    cases = {
        "truncated": ([str(proto), "--weights", str(truncated)], rf"error: weights {re.escape(str(truncated))}: truncated or corrupt caffemodel \(.*\)"),
        "unknown": ([str(unknown)], rf"error: {re.escape(str(unknown))}: layer 'roi' has unsupported type 'ROIPooling' \(supported: .*\)"),
    }
    for name, (args, pattern) in cases.items():
        out = tmp_path / f"{name}.pt"
        r = CliRunner().invoke(app, ["prune", *args, "--method", "l1", "--ratio", "0.5", "--out", str(out)])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and re.fullmatch(pattern, lines[0]), (name, r.stderr, r.stdout)
        assert not out.exists()

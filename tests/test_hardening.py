"""Corrupted model files: ``surgery.load`` raises one clear ``ModelLoadError`` line or returns the very
model that was saved; never another exception, a crash, a hang, or a silently different model.

Hypothesis mutates the bytes of small valid files (truncate, flip bits, shuffle chunks, splice in
random bytes). A surgery checkpoint carries a sha256 checksum of its header and tensors (format
version 2), so a flipped bit anywhere, tensor data included, is an error. The command line gets the
same files: exit code 1 and one ``error:`` line, no traceback. ``SURGERY_HYPOTHESIS_EXAMPLES`` sets
the number of examples (default 60 per property).
"""

from __future__ import annotations

import functools
import os
import random
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import surgery
from surgery import checkpoint
from surgery.errors import ModelLoadError

EXAMPLES = int(os.environ.get("SURGERY_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    return surgery.prune(net, X, method="magnitude-unstructured", sparsity=0.7)


@functools.cache
def _files() -> dict[str, tuple[bytes, nn.Module]]:
    """Valid checkpoints of one small model: dense, and CSR (most weights as CSR components)."""
    net = _net()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("dense", "csr"):
            path = Path(tmp) / f"{fmt}.pt"
            surgery.save(net, path, format=fmt, metadata={"input_shape": list(X.shape), "method": "test"},
                         example_inputs=X)
            out[fmt] = (path.read_bytes(), net)
    return out


# -- mutations ----------------------------------------------------------------------------------
@st.composite
def mutated(draw, data: bytes) -> tuple[str, bytes]:
    """(description, mutated bytes); always different from ``data``."""
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "shuffle", "splice"]))
    if kind == "truncate":
        cut = draw(st.integers(0, n - 1))
        return f"truncate to {cut} bytes", data[:cut]
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=3,
                              unique_by=lambda f: f[0]))
        buf = bytearray(data)
        for pos, bit in flips:
            buf[pos] ^= 1 << bit
        return f"flip (byte, bit) {flips}", bytes(buf)
    if kind == "shuffle":
        cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=4, unique=True)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
        order = draw(st.permutations(range(len(chunks))))
        out = b"".join(chunks[i] for i in order)
        return f"shuffle chunks at {cuts} into order {order}", out
    start = draw(st.integers(0, n - 1))
    length = draw(st.integers(1, 64))
    junk = draw(st.binary(min_size=1, max_size=64))
    return f"splice {junk!r} over [{start}, {start + length})", data[:start] + junk + data[start + length:]


def _one_line_error(exc: BaseException, path: Path) -> None:
    text = str(exc)
    assert "\n" not in text and text.strip() == text and text, repr(text)
    assert text.startswith(str(path)), text


def _assert_same(model: nn.Module, reference: nn.Module) -> None:
    """The loaded model is the saved one: every tensor bit-identical, outputs equal."""
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


def check_load(path: Path, reference: nn.Module) -> str:
    """``surgery.load(path)``: a one-line ``ModelLoadError`` ("error") or the saved model ("same")."""
    try:
        model = surgery.load(path)
    except ModelLoadError as exc:
        _one_line_error(exc, path)
        return "error"
    _assert_same(model, reference)
    return "same"


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_valid_files_load(fmt, tmp_path):
    data, net = _files()[fmt]
    (tmp_path / "m.pt").write_bytes(data)
    assert check_load(tmp_path / "m.pt", net) == "same"


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_mutated_checkpoints_fail_cleanly_or_load_identically(fmt):
    data, net = _files()[fmt]
    seen = []

    @SETTINGS
    @given(mutation=mutated(data))
    def prop(mutation):
        what, blob = mutation
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.pt"
            path.write_bytes(blob)
            try:
                seen.append(check_load(path, net))
            except AssertionError as exc:
                raise AssertionError(f"{fmt} checkpoint, {what}: {exc}") from None
            try:  # the header reader obeys the same rule
                checkpoint.read_metadata(path)
            except ModelLoadError as exc:
                _one_line_error(exc, path)

    prop()
    assert "error" in seen


def test_every_single_bit_flip_in_tensor_data_is_caught(tmp_path):
    """safetensors has no checksum of its own: each data byte of the CSR file, one bit flipped, is refused."""
    data, net = _files()["csr"]
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    for pos in rng.sample(range(header_end, len(data)), 40):
        buf = bytearray(data)
        buf[pos] ^= 1 << rng.randrange(8)
        (tmp_path / "m.pt").write_bytes(bytes(buf))
        with pytest.raises(ModelLoadError, match=r"checksum mismatch: the file is corrupt"):
            surgery.load(tmp_path / "m.pt")


# -- command line -------------------------------------------------------------------------------
def _cli(args: list[str], cwd: Path):
    from typer.testing import CliRunner

    from surgery.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


def test_cli_on_mutated_checkpoints_one_line_exit_1():
    data, net = _files()["csr"]
    params = f"{sum(p.numel() for p in net.parameters()):,}"

    @settings(SETTINGS, max_examples=max(10, EXAMPLES // 3))
    @given(mutation=mutated(data))
    def prop(mutation):
        what, blob = mutation
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "m.pt").write_bytes(blob)
            r = _cli(["stats", "m.pt"], Path(tmp))
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            if r.exit_code == 0:  # it decoded: then it is the saved model
                assert params in r.stdout, (what, r.stdout)
                return
            assert r.exit_code == 1, (what, r.exit_code, r.stderr)
            assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, (what, r.stderr)
            assert re.search(r"m\.pt", lines[0]), (what, lines[0])

    prop()


# -- foreign formats: ONNX (surgery.io.load_model) and Caffe (surgery.load(prototxt, weights=)) ----
# Neither format carries a checksum, so a flipped bit in weight data loads a different model (the
# two strict xfails below record that); what is asserted is one clear error or a model that runs.
ONNX_SHAPE = (1, 3, 8, 8)


@functools.cache
def _onnx_bytes() -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
            for n, s in (("W", (4, 3, 3, 3)), ("B", (4,)), ("G", (2, 4)))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(ONNX_SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


CAFFE_PROTO = b'''name: "tiny"
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 2 } }
'''


@functools.cache
def _caffemodel_bytes() -> bytes:
    import numpy as np
    from caffe_nets import write_caffemodel

    rng = np.random.default_rng(0)
    blobs = {"conv1": [rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)],
             "bn1": [rng.standard_normal(4), rng.random(4) + 0.5, np.ones(1)],
             "scale1": [rng.standard_normal(4), rng.standard_normal(4)], "fc": [rng.standard_normal((2, 64)), rng.standard_normal(2)]}
    with tempfile.TemporaryDirectory() as tmp:
        write_caffemodel(Path(tmp) / "w.caffemodel", blobs)
        return (Path(tmp) / "w.caffemodel").read_bytes()


def _load_onnx(path: Path) -> nn.Module:
    from surgery.io import load_model

    return load_model(str(path))[0]


def _load_caffe(proto: Path, weights: Path) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return surgery.load(proto, weights=weights)


def _clean_or_runs(load, paths: tuple[Path, ...], what: str) -> str:
    """One line ``ModelLoadError`` naming one of ``paths`` ("error"), or a model that runs on its input and
    returns tensors ("loads"); which values it computes is not checked (no checksum in these formats)."""
    try:
        model = load()
    except ModelLoadError as exc:
        text = str(exc)
        assert text and "\n" not in text and any(str(p) in text for p in paths), f"{what}: {text!r}"
        return "error"
    with torch.no_grad():
        y = model(torch.randn(ONNX_SHAPE))
    # a renamed blob can make a valid net with two outputs (Caffe returns every unconsumed top)
    outs = list(y) if isinstance(y, (list, tuple)) else [y]
    assert outs and all(isinstance(t, torch.Tensor) for t in outs), f"{what}: output {type(y).__name__}"
    return "loads"


def _mutate_onnx(blob: bytes, what: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(blob)
        return _clean_or_runs(lambda: _load_onnx(path), (path,), f"onnx, {what}")


def _mutate_caffe(proto: bytes, weights: bytes, what: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        p, w = Path(tmp) / "deploy.prototxt", Path(tmp) / "net.caffemodel"
        p.write_bytes(proto)
        w.write_bytes(weights)
        return _clean_or_runs(lambda: _load_caffe(p, w), (p, w), f"caffe, {what}")


def test_foreign_files_are_valid():
    assert _mutate_onnx(_onnx_bytes(), "unchanged") == "loads"
    assert _mutate_caffe(CAFFE_PROTO, _caffemodel_bytes(), "unchanged") == "loads"


@pytest.mark.parametrize("target", ["prototxt", "caffemodel"])
def test_mutated_caffe_files_fail_cleanly_or_load(target):
    good = CAFFE_PROTO if target == "prototxt" else _caffemodel_bytes()

    @settings(SETTINGS, max_examples=max(10, EXAMPLES // 2))
    @given(mutation=mutated(good))
    def prop(mutation):
        what, blob = mutation
        if target == "prototxt":
            _mutate_caffe(blob, _caffemodel_bytes(), f"prototxt {what}")
        else:
            _mutate_caffe(CAFFE_PROTO, blob, f"caffemodel {what}")

    prop()


#: Single-bit flips of ``_onnx_bytes()`` (719 bytes), one of each failure family that a scan of all
#: 5752 single-bit flips found in the ONNX loader on 2026-11-24 (171 escaping exceptions, 2 two-line
#: errors; also 3376 silently different models, which no loader can catch without a checksum). The
#: ONNX front end turned them into one-line errors in b00225a; these keep them that way.
ONNX_FLIPS = [
    pytest.param(5, 5, id="elem-type-was-TypeError"),  # 'The element type in the input tensor is UNDEFINED.'
    pytest.param(16, 3, id="shape-inference-was-InferenceError"),  # '(op_type:Conv ...): Output 0 is out of bounds.'
    pytest.param(21, 7, id="op-type-not-utf8-was-TypeError"),  # onnx.defs.get_schema() on a non-UTF-8 op_type
    pytest.param(152, 1, id="initializer-size-was-ValueError"),  # 'cannot reshape array of size 432 into (4,3,3,3)'
    pytest.param(152, 5, id="initializer-dtype-was-KeyError"),  # KeyError '33': an unknown tensor data type
    pytest.param(20, 3, id="error-spanned-two-lines"),  # the message quoted a corrupt op_type holding a newline
]


@pytest.mark.parametrize("pos, bit", ONNX_FLIPS)
def test_onnx_single_bit_flips_that_used_to_crash(pos, bit):
    buf = bytearray(_onnx_bytes())
    buf[pos] ^= 1 << bit
    _mutate_onnx(bytes(buf), f"flip byte {pos} bit {bit}")


def test_mutated_onnx_files_fail_cleanly_or_load():
    good = _onnx_bytes()

    @settings(SETTINGS, max_examples=max(10, EXAMPLES // 3))
    @given(mutation=mutated(good))
    def prop(mutation):
        what, blob = mutation
        _mutate_onnx(blob, what)

    prop()


@pytest.mark.xfail(reason="ONNX and Caffe files carry no checksum: a flipped bit in weight data loads a silently "
                          "different model (surgery checkpoints carry one)", strict=True)
@pytest.mark.parametrize("fmt", ["onnx", "caffemodel"])
def test_flipped_weight_bit_in_foreign_formats_goes_unnoticed(fmt):
    import numpy as np

    first = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32).ravel()[:1].tobytes()
    data = _onnx_bytes() if fmt == "onnx" else _caffemodel_bytes()
    buf = bytearray(data)
    buf[data.index(first) + 1] ^= 0x10  # a mantissa bit of the first conv weight: still a finite float
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(ModelLoadError):
        if fmt == "onnx":
            (Path(tmp) / "m.onnx").write_bytes(bytes(buf))
            _load_onnx(Path(tmp) / "m.onnx")
        else:
            (Path(tmp) / "deploy.prototxt").write_bytes(CAFFE_PROTO)
            (Path(tmp) / "net.caffemodel").write_bytes(bytes(buf))
            _load_caffe(Path(tmp) / "deploy.prototxt", Path(tmp) / "net.caffemodel")

"""Load a model from a spec or a file, safely.

Specs
    ``torchvision:NAME`` (random init), ``timm:NAME`` (needs ``timm``), ``package.module:factory``
    (imported and called with ``kwargs``; the current directory is importable).
Files
    ``.pt``/``.pth`` whole-module pickles: ``torch.load(weights_only=True)`` with an allow-list of
    ``torch.nn``, ``torchvision`` and ``surgery`` module classes, so a pickle that names anything
    else (a foreign class, ``os.system``) is refused before any of its code can run; ``trust=True``
    unpickles fully. ``.pt2`` (``torch.export``), and surgery checkpoints (any extension, detected
    from the header; one saved as the user's own class comes back as that class, classes outside
    torch/torchvision/timm/transformers/surgery only with ``trust=True``). ``weights=`` loads a
    state_dict (``weights_only=True`` or safetensors).

``.onnx`` files (:mod:`surgery.frontends.onnx`) and Keras/TensorFlow models (``.keras``, ``.h5``,
frozen ``.pb``, SavedModel directories; :mod:`surgery.frontends.tensorflow`, converted in a
subprocess) are folded for ``input_shape`` when given.

Every failure is a :class:`~surgery.errors.ModelLoadError` with one line. Input files are only read.

Examples
--------
>>> model, shape, source = load_model("torchvision:resnet18")
>>> shape, source
((1, 3, 224, 224), 'torchvision:resnet18')
>>> parse_input_shape("1,3,64,64")
(1, 3, 64, 64)
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
import re
import sys
import zipfile

import torch
from torch import nn

from . import _allowlist as allow
from . import checkpoint
from .errors import ModelLoadError, SurgeryError

__all__ = ["load_model", "load_weights", "parse_input_shape", "file_kind"]

_SPEC = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$")
_FILE_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx", ".bin", ".ckpt", ".safetensors", ".pkl", ".keras", ".h5", ".pb")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; raises ``SurgeryError``."""
    parts = [p.strip() for p in re.split(r"[,x×]", str(text).strip().strip("()[]")) if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise SurgeryError(f"input shape must be positive integers separated by commas (e.g. 1,3,224,224), got {text!r}")
    return shape


def _one_line(exc: BaseException) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# -- specs ------------------------------------------------------------------------------------
def _torchvision_shape(name: str) -> tuple[int, ...] | None:
    import torchvision

    group = torchvision.models.get_model_builder(name).__module__
    if ".optical_flow." in group:
        return None  # two images in, flow out
    size = [224]
    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        size = list(getattr(t, "crop_size", None) or getattr(t, "resize_size", None) or size)
    except Exception:  # no weights registered for this builder: keep the ImageNet default
        pass
    hw = (size[0], size[-1]) if size[0] > 0 else (224, 224)
    if ".video." in group:
        return (1, 3, 16, *hw)
    return (1, 3, *hw)


def _load_torchvision(name: str, kwargs: dict):
    try:
        import torchvision
    except ImportError:
        raise ModelLoadError("torchvision:NAME needs torchvision (pip install torchvision)") from None
    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelLoadError(f"unknown torchvision model {name!r}{hint}")
    try:
        import inspect

        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:  # detectors/segmenters: no download
            kwargs = {"weights_backbone": None, **kwargs}
        model = builder(weights=None, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot build torchvision:{name}: {_one_line(exc)}") from None
    return model, _torchvision_shape(name)


def _load_timm(name: str, kwargs: dict):
    try:
        import timm
    except ImportError:
        raise ModelLoadError(f"timm:{name} needs the timm package (pip install timm)") from None
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot build timm:{name}: {_one_line(exc)}") from None
    size = (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}).get("input_size")
    return model, ((1, *size) if size else None)


def _load_factory(modname: str, attr: str, kwargs: dict):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name and modname.split(".")[0] == exc.name.split(".")[0]:
            raise ModelLoadError(
                f"unknown model spec {modname}:{attr}: {modname!r} is not an importable module "
                f"(known prefixes: torchvision:NAME, timm:NAME, package.module:factory)"
            ) from None
        raise ModelLoadError(f"cannot import {modname}: {_one_line(exc)}") from None
    except Exception as exc:
        raise ModelLoadError(f"cannot import {modname}: {_one_line(exc)}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ModelLoadError(f"module {modname} has no callable {attr!r}")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{modname}:{attr}() failed: {_one_line(exc)}") from None
    return model, None


# -- files ------------------------------------------------------------------------------------
def file_kind(path: str) -> str:
    """Sniff ``path``: ``"empty" | "checkpoint" | "safetensors" | "zip" | "torchscript" | "pickle" | "pt2" | "onnx" | "unknown"``."""
    if os.path.getsize(path) == 0:
        return "empty"
    if checkpoint.is_checkpoint(path):
        return "checkpoint"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[8:9] == b"{" and checkpoint._header(path) is not None:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        if path.endswith(".pt2"):
            return "pt2"
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("/constants.pkl") for n in z.namelist()):
                    return "torchscript"
        except (zipfile.BadZipFile, OSError):
            pass  # truncated: torch.load reports it
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if path.endswith(".onnx"):
        return "onnx"
    return "unknown"


def _refuse(path: str, name: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: refusing to unpickle {name} (not on the allow-list of torch.nn/torchvision/surgery "
                          f"classes); pass --trust (trust=True) only if you trust this file")


def _unpickler_reason(exc: BaseException) -> str:
    """The useful line of a ``weights_only`` refusal (torch wraps it in a long explanation)."""
    m = _GLOBAL_RE.search(str(exc))
    if m:
        return m.group(1)
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)


def _short(exc: BaseException) -> str:
    """First sentence of the first line of an exception message."""
    line = _one_line(exc)
    return line.split(". ", 1)[0]


def _torch_load(path: str, trust: bool):
    """``torch.load`` with the class allow-list (or fully, with ``trust``), errors as one line."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    extra = {}
    if zipfile.is_zipfile(path):
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
            obj = allow.resolve_pickle_global(name)
            if obj is None:
                raise _refuse(path, name)
            extra[name] = obj
    for _ in range(1000):  # legacy (non-zip) files: learn the globals one refusal at a time
        try:
            with torch.serialization.safe_globals(list(extra.values())):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            m = _GLOBAL_RE.search(str(exc))
            if not m:
                raise ModelLoadError(f"{path}: refusing to load: the pickle needs more than a weights-only load allows "
                                     f"({_unpickler_reason(exc)}); pass --trust only if you trust this file") from None
            obj = allow.resolve_pickle_global(m.group(1))
            if obj is None or m.group(1) in extra:
                raise _refuse(path, m.group(1)) from None
            extra[m.group(1)] = obj
    raise ModelLoadError(f"{path}: too many classes to unpickle")


def _load_pickle(path: str, trust: bool):
    try:
        obj = _torch_load(path, trust)
    except ModelLoadError:
        raise
    except Exception as exc:
        text = str(exc)
        if "central directory" in text or "zip archive" in text or isinstance(exc, (EOFError, zipfile.BadZipFile)):
            raise ModelLoadError(f"{path}: truncated or corrupt file ({_short(exc)})") from None
        raise ModelLoadError(f"{path}: cannot load ({_short(exc)})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a state_dict, not a model; load it into a model spec with --weights {path}")
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def _load_pt2(path: str):
    try:
        ep = torch.export.load(path)
        model = ep.module()
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load torch.export program ({_one_line(exc)})") from None
    shape = None
    names = set(ep.graph_signature.user_inputs)
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and n.name in names and isinstance(val, torch.Tensor):
            dims = [_concrete(s) for s in val.shape]
            shape = tuple(dims) if None not in dims else None  # dynamic without a hint: ask --input-shape
            break
    return model, shape


def _concrete(size) -> int | None:
    """A size of an exported program's input: the int, a symbolic size's example hint, or None."""
    try:
        return int(size)
    except Exception:  # an unbacked or hint-less symbolic size
        hint = getattr(getattr(size, "node", None), "hint", None)
        return int(hint) if hint is not None else None


def _load_file(path: str, trust: bool, input_shape=None):
    from .frontends import tensorflow as tf_frontend  # imports no TensorFlow: it converts in a subprocess

    if tf_frontend.is_tensorflow_model(path):
        model, shape = tf_frontend.load_tensorflow(path, input_shape)
        return model, shape, f"TensorFlow model {path}"
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a directory, not a model file")
    try:
        kind = file_kind(path)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if kind == "empty":
        raise ModelLoadError(f"{path} is empty")
    if kind == "checkpoint":
        model = checkpoint.load(path, trust=trust)
        meta = checkpoint.metadata_of(model)
        shape = meta.get("input_shape") or ((meta.get("plan") or {}).get("input_shapes") or [None])[0]
        return model, (tuple(int(s) for s in shape) if shape else None), f"surgery checkpoint {path}"
    if kind == "safetensors":
        raise ModelLoadError(f"{path} is a safetensors state_dict, not a model; load it into a model spec with --weights {path}")
    if kind == "pt2":
        model, shape = _load_pt2(path)
        return model, shape, f"torch.export program {path}"
    if kind == "torchscript":
        raise ModelLoadError(f"{path} is a TorchScript archive; surgery needs an nn.Module (save it with torch.save or torch.export)")
    if kind == "onnx":
        from .frontends.onnx import load_onnx

        model, shape = load_onnx(path, input_shape)
        return model, shape, f"ONNX model {path}"
    if kind in ("zip", "pickle"):
        return _load_pickle(path, trust), None, f"whole-module pickle {path}"
    raise ModelLoadError(f"{path} is not a model file (not a torch.save zip/pickle, torch.export program or surgery checkpoint)")


# -- weights ------------------------------------------------------------------------------------
def _read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights {path}: no such file")
    kind = file_kind(path)
    if kind == "empty":
        raise ModelLoadError(f"weights {path} is empty")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:
            raise ModelLoadError(f"weights {path}: truncated or corrupt ({_short(exc)})") from None
    if kind not in ("zip", "pickle"):
        raise ModelLoadError(f"weights {path} is not a state_dict file (torch.save or safetensors)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(f"weights {path}: refusing to unpickle ({_unpickler_reason(exc)}); "
                             f"--weights takes a plain state_dict") from None
    except Exception as exc:
        raise ModelLoadError(f"weights {path}: truncated or corrupt ({_short(exc)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ModelLoadError(f"weights {path} is not a state_dict (a dict of name -> tensor)")
    return sd


def load_weights(model: nn.Module, path: str, source: str = "the model") -> None:
    """Load the state_dict at ``path`` into ``model`` (strict), with a one-line report of misfits."""
    sd = _read_state_dict(os.fspath(path))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    if problems:
        raise ModelLoadError(f"weights {path} do not fit {source}: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=True)


# -- entry point --------------------------------------------------------------------------------
def load_model(spec_or_path, *, trust: bool = False, kwargs: dict | None = None, weights=None, input_shape=None):
    """Load a model; returns ``(module, input_shape or None, source_description)``.

    ``spec_or_path`` is an existing file, or ``torchvision:NAME``, ``timm:NAME``,
    ``package.module:factory``. ``kwargs`` go to the model builder; ``weights`` is a state_dict
    file loaded (strictly) into the result. ``input_shape`` fixes the input of an ONNX or
    TensorFlow model (its shape-only subgraphs are folded for it). See the module docstring.
    """
    text = os.fspath(spec_or_path)
    kwargs = dict(kwargs or {})
    prefix, _, rest = text.partition(":")
    if prefix in ("torchvision", "timm") and rest:
        model, shape = (_load_torchvision if prefix == "torchvision" else _load_timm)(rest, kwargs)
        source = text
    elif text.lower().endswith(".prototxt"):  # Caffe: ``weights`` is the .caffemodel, read with the net
        from .frontends.caffe import load_caffe

        model = load_caffe(text, weights)
        shape, source = tuple(model.meta["caffe"]["input_shapes"][0]), f"Caffe net {text}"
        source, weights = source + (f" + weights {os.fspath(weights)}" if weights is not None else ""), None
    elif os.path.exists(text):
        if kwargs:
            raise ModelLoadError(f"{text}: builder keyword arguments only apply to model specs")
        model, shape, source = _load_file(text, trust, input_shape)
    elif text.lower().endswith(_FILE_SUFFIXES) or os.sep in text:
        raise ModelLoadError(f"{text}: no such file")
    elif _SPEC.match(text):
        model, shape = _load_factory(*text.split(":"), kwargs)
        source = text
    else:
        raise ModelLoadError(
            f"cannot load {text!r}: not an existing file, and not a model spec "
            f"(torchvision:NAME, timm:NAME, package.module:factory)"
        )
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{source} gave a {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, os.fspath(weights), source)
        source += f" + weights {os.fspath(weights)}"
    return model, shape, source

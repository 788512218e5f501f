"""Which models the zoo sweep runs, and how each is built at the smallest input it accepts.

A *spec* is a small dict that names one model: ``{"zoo": "timm", "family": "resnet", "name": "resnet10t"}``
or ``{"zoo": "torchvision", "kind": "video", "name": "r3d_18"}``. Specs cross the process boundary as
JSON; ``build(spec)`` (run in the child) turns one into a model and example inputs. Nothing here
downloads weights: timm models are made with ``pretrained=False``, torchvision ones with
``weights=None`` (and ``weights_backbone=None`` where a backbone would otherwise be fetched).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

#: The smallest inputs tried first (image side; video frames x side), then the model's native size.
IMAGE_SIDES = (64, 56, 96, 112, 128)  # 56, 112: patch 14
VIDEO_SHAPES = ((4, 32, 32), (8, 64, 64), (16, 112, 112))

#: A CI-sized subset (``--quick``).
QUICK_TIMM = ("resnet", "mobilenetv3", "convnext", "vision_transformer", "efficientnet")
QUICK_TORCHVISION = ("resnet18", "mobilenet_v3_small", "lraspp_mobilenet_v3_large", "r3d_18")


# ---------------------------------------------------------------------------------------------- listing

def torchvision_specs(kinds=("classification", "segmentation", "video")) -> list[dict]:
    import torchvision.models as tvm

    modules = {"classification": tvm, "segmentation": tvm.segmentation, "video": tvm.video}
    return [{"zoo": "torchvision", "kind": kind, "name": name}
            for kind in kinds for name in tvm.list_models(module=modules[kind])]


def _count_params(names: list[str]) -> dict[str, int | str]:
    """Parameter counts of timm models built on the meta device (no memory, no init FLOPs)."""
    import timm

    out: dict[str, int | str] = {}
    for name in names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            out[name] = sum(p.numel() for p in model.parameters())
        except Exception as exc:  # a model that cannot be built on meta is ranked last
            out[name] = f"{type(exc).__name__}: {str(exc)[:100]}"
    return out


def timm_family_specs(families=None, cache: Path | None = None, timeout: float = 1800) -> list[dict]:
    """One spec per timm model module (its *family*): the model with the fewest parameters.

    Counting every model costs ~0.1 s each on the meta device; it runs in a child process and the
    counts are cached in ``cache`` (keyed by the timm version).
    """
    import timm

    modules = timm.list_modules()
    if families:
        unknown = sorted(set(families) - set(modules))
        if unknown:
            raise SystemExit(f"unknown timm families: {', '.join(unknown)}")
        modules = [m for m in modules if m in families]
    members = {m: timm.list_models(module=m) for m in modules}
    counts: dict = {}
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("timm") == timm.__version__:
            counts = stored["params"]
    missing = [n for m in modules for n in members[m] if n not in counts]
    if missing:
        code = ("import json, sys; sys.path.insert(0, %r); from zoo_models import _count_params; "
                "print(json.dumps(_count_params(json.loads(sys.stdin.read()))))" % str(Path(__file__).parent))
        print(f"counting parameters of {len(missing)} timm models on the meta device ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(missing), capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode:
            raise SystemExit(f"counting timm parameters failed: {proc.stderr.strip().splitlines()[-1:]}")
        counts.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"timm": timm.__version__, "params": counts}, indent=0, sort_keys=True))
    specs = []
    for m in modules:
        ranked = sorted(members[m], key=lambda n: (not isinstance(counts.get(n), int), counts.get(n) if isinstance(counts.get(n), int) else 0, n))
        if ranked:
            n = ranked[0]
            specs.append({"zoo": "timm", "family": m, "name": n,
                          "params": counts[n] if isinstance(counts.get(n), int) else None})
    return specs


# ---------------------------------------------------------------------------------------------- building

def _torchvision_builder(spec: dict):
    import torchvision.models as tvm

    name, kind = spec["name"], spec["kind"]
    base: dict = {"weights": None}
    if kind == "segmentation":
        base["weights_backbone"] = None  # the default backbone weights would be downloaded
    if name in ("inception_v3", "googlenet"):
        base.update(aux_logits=False, init_weights=False)

    def make(**kw):
        return tvm.get_model(name, **base, **kw)

    if kind == "video":
        shapes = [(1, 3, *s) for s in VIDEO_SHAPES]
        resized = []  # mvit's builders fix spatial_size and temporal_size: native input
        native = (1, 3, 16, 224, 224)
    else:
        shapes = [(1, 3, s, s) for s in IMAGE_SIDES]
        resized = []
        if name.startswith("vit_"):
            patch = int(name.rsplit("_", 1)[1])
            side = patch * 4
            resized = [({"image_size": side}, (1, 3, side, side))]
        elif name.startswith("maxvit"):
            resized = [({"input_size": (s, s)}, (1, 3, s, s)) for s in (64, 128)]
        native = (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)
    return make, shapes, resized, native


def _timm_builder(spec: dict):
    import timm

    name = spec["name"]

    def make(**kw):
        return timm.create_model(name, pretrained=False, **kw)

    shapes = [(1, 3, s, s) for s in IMAGE_SIDES]
    resized = [({"img_size": s}, (1, 3, s, s)) for s in (64, 56, 112)]
    return make, shapes, resized, None  # native: the model's own pretrained_cfg


def _prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode; parameters that are exactly zero (zero-init residual gammas, class tokens) get small
    random values, or every branch behind them would trivially satisfy pruned == masked."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() and not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def _runs(model, shape) -> str:
    """'' when the model runs on a random input of ``shape``, else the first error line."""
    try:
        with torch.no_grad():
            model(torch.randn(shape))
        return ""
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"


def build(spec: dict) -> tuple[torch.nn.Module, tuple, dict]:
    """The model of ``spec`` and the smallest example input it runs on (tried in order: the default
    model at small sizes, the model built for a small size, the default model at its native size).
    Returns ``(model, (x,), {"input": shape, "kwargs": ...})``."""
    make, shapes, resized, native = (_timm_builder if spec["zoo"] == "timm" else _torchvision_builder)(spec)
    torch.manual_seed(0)
    model = _prepare(make())
    errors = []
    for shape in shapes:
        err = _runs(model, shape)
        if not err:
            return model, (torch.randn(shape),), {"input": list(shape), "kwargs": {}}
        errors.append(err)
    fixed = getattr(model, "pretrained_cfg", {}).get("input_size")
    if native is None:
        native = (1, *fixed) if fixed else (1, 3, 224, 224)
    del model  # large models: never two in memory at once
    gc.collect()
    for kw, shape in resized:
        try:
            torch.manual_seed(0)
            small = _prepare(make(**kw))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            continue
        err = _runs(small, shape)
        if not err:
            return small, (torch.randn(shape),), {"input": list(shape), "kwargs": {k: v for k, v in kw.items()}}
        errors.append(err)
        del small
        gc.collect()
    torch.manual_seed(0)
    model = _prepare(make())
    err = _runs(model, native)
    if not err:
        return model, (torch.randn(native),), {"input": list(native), "kwargs": {}}
    raise RuntimeError(f"the model runs on no input tried ({errors[0]}; native {tuple(native)}: {err})")

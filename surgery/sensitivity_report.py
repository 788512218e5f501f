"""The result of a sensitivity analysis: one row per (group, ratio), curves, CSV, a plot, and the
per-layer ratios it suggests (see :mod:`surgery.sensitivity`)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field


from .errors import PlanError, SurgeryError

__all__ = ["SensitivityResult", "SensitivityRow", "CSV_HEADER", "DEFAULT_MAX_DROP", "DEFAULT_MAX_ERROR"]

DEFAULT_MAX_DROP = 0.01
DEFAULT_MAX_ERROR = 0.05
CSV_HEADER = ("group", "producer", "label", "size", "ratio", "kept", "loss", "accuracy", "accuracy_drop", "error")


@dataclass(frozen=True)
class SensitivityRow:
    """One group pruned alone at one ratio, and what the pruned model scored."""

    group: int
    producer: str  # the layer-ratio key: the group's first producer module (exact, escaped for fnmatch); "" if none
    label: str
    size: int
    ratio: float
    kept: int
    loss: float | None  # None without labels
    accuracy: float | None  # None without integer labels
    error: float  # relative output error vs the original model


@dataclass
class SensitivityResult:
    """Rows ``(group, ratio)`` in group order, the original model's metrics, and what was left out."""

    method: str
    ratios: tuple[float, ...]
    baseline: dict  # {"loss": .., "accuracy": .., "error": 0.0}; loss/accuracy None without labels
    rows: list[SensitivityRow]
    samples: int = 0
    skipped: dict = field(default_factory=dict)  # group id -> why it has no rows

    @property
    def metric(self) -> str:
        """``"accuracy"`` with integer labels, else ``"error"`` (what the plot and the rule use)."""
        return "accuracy" if self.baseline.get("accuracy") is not None else "error"

    def curves(self) -> dict[int, list[SensitivityRow]]:
        """Rows per group id, in ratio order."""
        out: dict[int, list[SensitivityRow]] = {}
        for r in self.rows:
            out.setdefault(r.group, []).append(r)
        return out

    # -- per-layer ratios ---------------------------------------------------------------------
    def layer_ratios(self, max_drop: float | None = None, max_error: float | None = None) -> dict[str, float]:
        """``{pattern: ratio}`` for ``layer_ratios=`` / ``--layer-ratio @FILE``.

        A tested ratio passes when the top-1 accuracy drops by at most ``max_drop`` (absolute,
        0.01 = one point; default 0.01) with labels, or when the relative output error is at most
        ``max_error`` (default 0.05) without them; ``max_error`` given with labels must hold too.
        Each group gets the largest ratio that passes *together with every smaller tested ratio*
        (one noisy lucky point does not count); a group that fails at its smallest ratio gets
        ``0.0``, so a plan keeps it whole instead of pruning it at the default ratio. The key is
        the group's first producer module whose name belongs to no other group: an exact name,
        fnmatch-escaped, so it matches that group only. Groups with no such name are left out.
        """
        for name, v in (("max_drop", max_drop), ("max_error", max_error)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v)):
                raise PlanError(f"{name} must be a finite number >= 0, got {v!r}")
        acc = self.metric == "accuracy"
        if max_drop is not None and not acc:
            raise PlanError("max_drop needs labelled data (accuracy); without labels use max_error")
        if acc and max_drop is None:
            max_drop = DEFAULT_MAX_DROP
        if not acc and max_error is None:
            max_error = DEFAULT_MAX_ERROR

        def passes(r: SensitivityRow) -> bool:
            ok = True
            if max_drop is not None:
                ok = self.baseline["accuracy"] - r.accuracy <= max_drop + 1e-12
            if max_error is not None:
                ok = ok and r.error <= max_error
            return ok

        out: dict[str, float] = {}
        for rows in self.curves().values():
            if not rows[0].producer:
                continue
            best = 0.0
            for r in rows:
                if not passes(r):
                    break
                best = r.ratio
            out[rows[0].producer] = best
        return out

    def layer_ratios_text(self, max_drop: float | None = None, max_error: float | None = None) -> str:
        """The :meth:`layer_ratios` as ``PATTERN=RATIO`` lines (with a ``#`` header) for ``@FILE``."""
        lr = self.layer_ratios(max_drop, max_error)
        if self.metric == "accuracy":
            rule = f"accuracy drop <= {DEFAULT_MAX_DROP if max_drop is None else max_drop:g}"
            rule += f", output error <= {max_error:g}" if max_error is not None else ""
        else:
            rule = f"output error <= {DEFAULT_MAX_ERROR if max_error is None else max_error:g}"
        head = [f"# surgery sensitivity: method {self.method}, ratios {','.join(f'{r:g}' for r in self.ratios)}, {rule}",
                "# use with: surgery prune MODEL --method " + self.method + " --layer-ratio @THIS_FILE"]
        return "\n".join([*head, *(f"{k}={v:g}" for k, v in lr.items())]) + "\n"

    # -- files --------------------------------------------------------------------------------
    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        base_acc = self.baseline.get("accuracy")

        def num(v):
            return "" if v is None else f"{v:.6g}"

        for r in self.rows:
            drop = None if r.accuracy is None or base_acc is None else base_acc - r.accuracy
            w.writerow([r.group, r.producer, r.label, r.size, f"{r.ratio:g}", r.kept, num(r.loss), num(r.accuracy),
                        num(drop), num(r.error)])
        return buf.getvalue()

    def to_csv(self, path) -> None:
        """One row per (group, ratio), header :data:`CSV_HEADER`; empty cells for missing metrics."""
        with open(path, "w", newline="") as f:
            f.write(self.csv_text())

    def png(self, legend_max: int = 10) -> bytes:
        """The plot as PNG bytes (see :meth:`plot`)."""
        try:
            from matplotlib import colormaps
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize
            from matplotlib.figure import Figure
            from matplotlib.ticker import PercentFormatter
        except ImportError:
            raise SurgeryError("the sensitivity plot needs matplotlib (pip install matplotlib)") from None
        acc = self.metric == "accuracy"
        curves = self.curves()
        base = self.baseline["accuracy"] if acc else 0.0
        fig = Figure(figsize=(9, 5.5))  # no pyplot: no global backend or figure state (Agg canvas)
        ax = fig.add_subplot()
        n = len(curves)

        def harm(rows) -> tuple[float, float]:  # worst point, then the mean over the ratios
            h = [(base - r.accuracy) if acc else r.error for r in rows]
            return max(h), sum(h) / len(h)

        ranked = sorted(curves, key=lambda gid: harm(curves[gid]), reverse=True)
        named = set(ranked[:legend_max])
        many = n > legend_max
        cmap = colormaps["viridis" if many else "tab10"]
        for i, (gid, rows) in enumerate(curves.items()):
            color = cmap(i / max(1, n - 1)) if many else cmap(i % 10)
            xs = [0.0, *(r.ratio for r in rows)]
            ys = [base, *((r.accuracy if acc else r.error) for r in rows)]
            name = rows[0].producer or rows[0].label
            ax.plot(xs, ys, marker="o", markersize=3, color=color, lw=1.6 if gid in named else 0.8,
                    alpha=1.0 if gid in named else 0.5, label=f"{name} ({rows[0].size})" if gid in named else None)
        if acc:
            ax.axhline(base, color="gray", ls="--", lw=0.8, label="unpruned")
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("fraction of the group's channels removed (one group at a time)")
        ax.set_ylabel("top-1 accuracy" if acc else "relative output error ||y' - y|| / ||y||")
        ax.set_title(f"Sensitivity to pruning ({self.method}, {self.samples} samples)")
        ax.grid(alpha=0.3)
        if many:
            fig.colorbar(ScalarMappable(Normalize(0, n - 1), cmap), ax=ax, pad=0.02, label="group order, input to output")
        if n:
            title = f"the {legend_max} most sensitive of {n} groups (layer, channels)" if many else "layer (channels)"
            ax.legend(title=title, fontsize=7, title_fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                      ncol=min(3, legend_max), frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        return buf.getvalue()

    def plot(self, path, legend_max: int = 10) -> None:
        """A PNG: one curve per group, ratio on x, accuracy (labels) or output error on y.

        With more than ``legend_max`` groups, curves are coloured by depth (colour bar) and only
        the ``legend_max`` most sensitive (worst at the largest ratio) are named in the legend."""
        data = self.png(legend_max)
        with open(path, "wb") as f:
            f.write(data)


# -- measuring -------------------------------------------------------------------------------------

"""Render the channel-dependency graph of a small model to docs/graph.png (needs matplotlib).

    python docs/render_graph.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import surgery  # noqa: E402


class Tiny(nn.Module):
    """conv-bn-relu stem, a residual block, a channel split + concat, and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.branch = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        a, b = x.split([4, 4], dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        return self.head(x.mean((2, 3)))


def main() -> Path:
    graph = surgery.trace(Tiny(), torch.randn(1, 3, 8, 8))
    g = graph.to_networkx()
    keep = [n for n, d in g.nodes(data=True) if d["groups"] and (d["kind"] == "param" or "dim 1" in n or d["size"] in (4, 8))]
    sub = g.subgraph(keep).copy()
    groups = sorted({gid for _, d in sub.nodes(data=True) for gid in d["groups"]})
    cmap = plt.get_cmap("tab10")
    colors = [cmap(groups.index(d["groups"][0]) % 10) for _, d in sub.nodes(data=True)]
    pos = nx.kamada_kawai_layout(sub.to_undirected())
    fig, ax = plt.subplots(figsize=(14, 10))
    nx.draw_networkx(sub, pos, ax=ax, node_color=colors, node_size=260, font_size=6, arrows=False, width=0.6)
    ax.set_title("Channel spaces of Tiny, coloured by group (surgery.trace(model, x).to_networkx())")
    ax.axis("off")
    out = Path(__file__).with_name("graph.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


if __name__ == "__main__":
    print(main())

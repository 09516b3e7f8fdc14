"""The report's three PNGs (matplotlib, Agg): ratio against key chunks, allowance heat map, error against length.

One panel per dtype, so no dtype's line hides under another's; solid lines are outputs and dashed
lines gradients, and the legends say so; plots in allowances draw the allowance (1) as a line;
colour bars are plain numbers (no offset), on a log scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from verify.accuracy.gate import chunk_label, fmt
from verify.accuracy.plan import key_chunks
from verify.accuracy.tables import worst

FLOOR = 1e-3  # log-scale plots show smaller values at this value


def _value(cells: list[dict], grads: bool, key: str) -> float:
    w = worst(cells, grads, key)
    return np.nan if w is None else max(w, FLOOR)


def _log_axes(ax: object) -> None:
    """Log scales (x base 2) where something was plotted; a note where every call failed (log axes would raise).

    Call it before reference lines such as ``axhline``: only the data lines count.
    """
    if any(np.isfinite(np.asarray(line.get_ydata(), float)).any() for line in ax.get_lines()):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no results (target errors)", ha="center", va="center", transform=ax.transAxes)


def plot(report: dict, out: Path) -> None:
    """Write the PNGs named in ``tables.PLOTS`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D

    cells = report["cells"]
    dtypes = list(dict.fromkeys(c["dtype"] for c in cells))
    families = list(dict.fromkeys(c["family"] for c in cells))
    style = [Line2D([], [], color="k", ls="-", label="output"), Line2D([], [], color="k", ls="--", label="gradients")]

    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.8 * len(dtypes), 3.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        mine = [c for c in cells if c["dtype"] == dtype]
        counts = sorted({key_chunks(c) for c in mine})
        for i, family in enumerate(families):
            sel = [[c for c in mine if c["family"] == family and key_chunks(c) == n] for n in counts]
            ax.plot(counts, [_value(s, False, "ratio") for s in sel], "o-", color=f"C{i}", label=family)
            ax.plot(counts, [_value(s, True, "ratio") for s in sel], "s--", color=f"C{i}")
        _log_axes(ax)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=dtype, xlabel="number of key chunks (rising: rescalings + 1)",
               ylabel="error / plain same-dtype error")
        ax.legend(handles=ax.get_legend_handles_labels()[0] + style, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ratio_vs_key_chunks.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.8 * len(dtypes), 3.9), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        length = max(c["length"] for c in cells if c["dtype"] == dtype)
        mine = [c for c in cells if c["dtype"] == dtype and c["length"] == length]
        order = lambda c: -1 if c is None else c  # noqa: E731
        qcs = sorted({c["query_chunk"] for c in mine}, key=order)
        kcs = sorted({c["key_chunk"] for c in mine}, key=order)
        grid = np.full((len(qcs), len(kcs)), np.nan)
        for i, qc in enumerate(qcs):
            for j, kc in enumerate(kcs):
                sel = [c for c in mine if c["query_chunk"] == qc and c["key_chunk"] == kc]
                if sel:
                    grid[i, j] = _value(sel, False, "max_allow")
        finite = grid[np.isfinite(grid)]
        norm = LogNorm(vmin=min(finite.min(), 0.1), vmax=max(finite.max(), 1.0)) if finite.size else None
        im = ax.imshow(grid, cmap="viridis", aspect="auto", norm=norm)
        for (i, j), val in np.ndenumerate(grid):
            label = fmt(None if np.isnan(val) else float(val)) + (" ✗" if val > 1 else "")
            ax.text(j, i, label, ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
        ax.set_xticks(range(len(kcs)), [chunk_label(k) for k in kcs])
        ax.set_yticks(range(len(qcs)), [chunk_label(q) for q in qcs])
        ax.set(xlabel="key chunk", ylabel="query chunk", title=f"{dtype}, L={length}: output, in allowances")
        fig.colorbar(im, ax=ax, format="%.3g")
    fig.tight_layout()
    fig.savefig(out / "allowance_heatmap.png", dpi=90)
    plt.close(fig)

    lengths = sorted({c["length"] for c in cells})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.8 * len(dtypes), 3.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for i, family in enumerate(families):
            sel = [[c for c in cells if c["dtype"] == dtype and c["family"] == family and c["length"] == n]
                   for n in lengths]
            ax.plot(lengths, [_value(s, False, "max_allow") if s else np.nan for s in sel], "o-", color=f"C{i}",
                    label=family)
            ax.plot(lengths, [_value(s, True, "max_allow") if s else np.nan for s in sel], "s--", color=f"C{i}")
        _log_axes(ax)
        ax.axhline(1.0, color="red", lw=1, label="allowance")
        ax.set(title=dtype, xlabel="sequence length L", ylabel="worst error / allowance")
        ax.legend(handles=ax.get_legend_handles_labels()[0] + style, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "allowance_vs_length.png", dpi=90)
    plt.close(fig)

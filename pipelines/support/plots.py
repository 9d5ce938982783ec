"""PNG figures of the evaluate stage: sample grids (PIL) and the Fréchet-distance-vs-NFE curve (matplotlib, Agg).

Both functions take plain numbers / integer-level images, so they are independent of torch and of how the samples
were made. Image convention (ctm_core.data.card): integer levels 0..num_levels-1 in (N, C, H, W) layout.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["grid_image", "plot_fd_vs_nfe", "save_grid"]


def grid_image(levels: np.ndarray, num_levels: int, grid_size: int, *, scale: int | None = None) -> np.ndarray:
    """Tile the first grid_size² images of ``levels: (N, C, H, W)`` (ints in 0..num_levels-1) into one uint8 image.

    Returns (grid_size·(H·scale + 2) + 2, same for W) for C = 1 or (..., ..., 3) for C = 3: cells separated by
    2 grey pixels; missing cells stay black.
    ``scale`` (nearest-neighbour upsampling) defaults to the smallest integer making each cell >= 32 pixels, so
    8×8 digits stay visible. Levels map to grey values by ``round(level / (num_levels − 1) · 255)``.
    """
    levels = np.asarray(levels)
    if levels.ndim != 4 or levels.shape[1] not in (1, 3):
        raise ValueError(f"levels: expected (N, C, H, W) with C in (1, 3), got shape {levels.shape}")
    if not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size: expected an int >= 1, got {grid_size!r}")
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels: expected an int >= 2, got {num_levels!r}")
    N, C, H, W = levels.shape
    scale = scale or max(1, math.ceil(32 / max(H, W)))
    pad = 2  # grey separator between cells (pixels after upscaling)
    u8 = np.rint(levels.astype(np.float64) / (num_levels - 1) * 255.0).clip(0, 255).astype(np.uint8)
    u8 = u8.repeat(scale, axis=2).repeat(scale, axis=3)  # (N, C, H·scale, W·scale)
    h, w = H * scale, W * scale
    canvas = np.full((grid_size * (h + pad) + pad, grid_size * (w + pad) + pad, C), 96, dtype=np.uint8)
    for k in range(grid_size * grid_size):
        r, c = divmod(k, grid_size)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = u8[k].transpose(1, 2, 0) if k < N else 0  # (C,H,W) -> (H,W,C)
    return canvas[..., 0] if C == 1 else canvas


def save_grid(path: str | os.PathLike, levels: np.ndarray, num_levels: int, grid_size: int) -> Path:
    """Write ``grid_image(...)`` as a PNG (grey for C = 1, RGB for C = 3) and return the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(grid_image(levels, num_levels, grid_size))  # (H, W) grey or (H, W, 3) RGB uint8
    Image.fromarray(arr).save(path, format="PNG")
    return path


def plot_fd_vs_nfe(
    path: str | os.PathLike,
    curves: Mapping[float, Sequence[tuple[int, float, float | None]]],
    *,
    baselines: Mapping[str, float] | None = None,
    extra_points: Mapping[str, Sequence[tuple[int, float, float | None]]] | None = None,
    title: str = "CTM student: Fréchet distance vs NFE",
    ylabel: str = "Fréchet distance (classifier features)",
) -> Path:
    """Line plot of FD against NFE, one colour per gamma, with error bars; baselines as horizontal lines.

    The FD axis is logarithmic (a 1-step teacher Euler baseline can be 100× the rest); the NFE axis is log2 when
    there is more than one NFE. Colours: γ lines take C0, C1, ... in increasing γ; baselines and extra points
    take the colours after them, so nothing shares a colour.

    Args:
        curves: gamma -> [(nfe, fd, fd_err or None), ...] (the student's gamma-sampler sweep).
        baselines: label -> fd, drawn as dashed horizontal lines (e.g. "teacher Heun 35 NFE", the data floor).
        extra_points: label -> [(nfe, fd, err), ...] drawn as markers only (e.g. the student's Heun sampler).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    colours = (f"C{k % 10}" for k in range(1000))  # one colour per line, never reused within the figure
    try:
        all_nfe: list[int] = []
        for gamma in sorted(curves):
            pts = sorted(curves[gamma])
            colour = next(colours)
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            err = [0.0 if p[2] is None or not math.isfinite(p[2]) else p[2] for p in pts]
            all_nfe += x
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour, label=f"CTM γ={gamma:g}")
        for label, pts in (extra_points or {}).items():
            pts = sorted(pts)
            x = [p[0] for p in pts]
            all_nfe += x
            err = [0.0 if p[2] is None or not math.isfinite(p[2]) else p[2] for p in pts]
            ax.errorbar(
                x,
                [p[1] for p in pts],
                yerr=err,
                marker="s",
                linestyle="none",
                capsize=3,
                color=next(colours),
                label=label,
            )
        for label, value in (baselines or {}).items():
            ax.axhline(value, linestyle="--", color=next(colours), linewidth=1.2, label=f"{label}: {value:.3g}")
        ax.set_yscale("log")
        if all_nfe and max(all_nfe) > 1:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(all_nfe))
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("NFE (network evaluations)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path

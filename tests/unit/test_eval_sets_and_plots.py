"""Seed sets, the data grid's choice of images, the headline keys and the FD-vs-NFE figure (ctm_core.eval.methods,
ctm_core.eval.scoring, pipelines.support.plots)."""

from __future__ import annotations

import numpy as np
import pytest

from ctm_core.eval.methods import across_classes, seed_sets
from ctm_core.eval.scoring import fd_curve_csv, fd_summary, headline_keys


def test_seed_sets_are_disjoint_equal_and_drop_the_rest():
    assert seed_sets(1000, 179) == [slice(k * 179, (k + 1) * 179) for k in range(5)]  # 895 images drawn
    assert seed_sets(40, 40) == [slice(0, 40)]
    with pytest.raises(ValueError, match="set_size"):
        seed_sets(100, 179)


def test_across_classes_round_robin_and_unlabelled():
    labels = np.array([0, 0, 0, 1, 1, 2, 0, 2])
    assert across_classes(labels, 6).tolist() == [0, 3, 5, 1, 4, 7]  # first of each class, then the second ...
    assert across_classes(labels, 100).tolist() == [0, 3, 5, 1, 4, 7, 2, 6]  # all, classes interleaved
    assert across_classes(np.full(10, -1), 4).tolist() == [0, 3, 6, 9]  # unlabelled: evenly spaced
    digits = np.repeat(np.arange(10), 50)  # sorted by class, as a naive "first 64" would show only 0s and 1s
    assert set(digits[across_classes(digits, 64)]) == set(range(10))


def test_fd_summary_headline_is_mean_of_the_sets_it_reports():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2000, 4))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    feats = rng.standard_normal((300, 4)) + 0.5  # Δμ = 0.5 per dim: FD ≈ 1 + small-sample bias
    sets = seed_sets(300, 100)
    flat, det = fd_summary("fd_x", feats, mu, sigma, sets, seed=0)
    fds = det["seed_sets"]["fds"]
    assert len(fds) == 3 and set(flat) == {"fd_x", "fd_x_std"}
    assert flat["fd_x"] == pytest.approx(np.mean(fds), rel=1e-12)
    assert flat["fd_x_std"] == pytest.approx(np.std(fds, ddof=1), rel=1e-12)
    assert det["seed_sets"]["min"] == min(fds) <= flat["fd_x"] and det["bootstrap"] is None
    assert 0.9 < flat["fd_x"] < 1.6
    one, det1 = fd_summary("fd_x", feats[:100], mu, sigma, seed_sets(100, 100), seed=0, num_bootstrap=50)
    assert one["fd_x"] == pytest.approx(fds[0], rel=1e-12) and det1["bootstrap"]["num_bootstrap"] == 50
    assert 0 < one["fd_x_std"] < one["fd_x"]


def test_headline_keys_and_curve_csv():
    assert headline_keys([1, 2], 35, 1) == [
        "fd_nfe1",
        "fd_nfe1_std",
        "fd_nfe2",
        "fd_nfe2_std",
        "fd_teacher_heun35",
        "fd_teacher_heun35_std",
        "fd_teacher_euler1",
        "fd_heldout_vs_train",
    ]
    m = {"fd_nfe1_gamma0": 20.0, "fd_nfe1_gamma0_std": 1.0, "fd_nfe2_gamma0.5": 12.5, "fd_nfe2_gamma0": 11.0}
    assert fd_curve_csv(m, [1, 2], [0.0, 0.5]) == "gamma,nfe,fd,fd_std\n0,1,20,1\n0,2,11,\n0.5,2,12.5,\n"


def test_plot_is_log_scale_with_one_colour_per_line(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from pipelines.support import plots

    seen = {}
    real_close = plt.close

    def keep(fig):  # inspect the figure before plot_fd_vs_nfe closes it
        ax = fig.axes[0]
        seen["yscale"] = ax.get_yscale()
        handles, labels = ax.get_legend_handles_labels()
        seen["labels"] = labels
        seen["colours"] = [
            matplotlib.colors.to_hex(h.get_color() if hasattr(h, "get_color") else h[0].get_color()) for h in handles
        ]
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    curves = {g: [(1, 20.0, 1.0), (2, 12.0 + g, 1.0), (4, 9.0, 0.5)] for g in (0.0, 0.5, 1.0)}
    out = plots.plot_fd_vs_nfe(
        tmp_path / "fd.png",
        curves,
        baselines={"teacher Heun 35 NFE": 9.8, "teacher Euler 1 NFE": 667.0, "data floor": 6.2},
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["yscale"] == "log"
    assert len(seen["labels"]) == 6 and any(lbl.startswith("data floor") for lbl in seen["labels"])
    assert len(set(seen["colours"])) == 6  # three γ lines and three baselines, no colour shared

"""The demo's plots: debiased smoothing, every curve labelled, held-out loss from step 0, the
settings in the title; the learning rate on a linear axis with the end of warmup and the end marked."""

from __future__ import annotations

import copy
import math

import pytest

from optimizer.demo import train

pytest.importorskip("matplotlib")


@pytest.fixture
def run():
    cfg = train.resolve_defaults({**copy.deepcopy(train.DEFAULTS), "steps": 60, "optimizers": ["adamw", "lion"]})
    lrs = [min(1.0, (s + 1) / 7) for s in range(60)]
    results = {
        name: {"history": {"loss": [5.5 - 0.04 * s for s in range(60)], "lr": [peak * x for x in lrs],
                           "held_out": [[s, 5.5 - 0.04 * s] for s in range(0, 61, 10)]}}
        for name, peak in (("adamw", 3e-3), ("lion", 3e-4))}
    return cfg, results


def test_smoothing_is_debiased_so_it_does_not_lag_from_zero():
    assert train.smooth([3.0] * 5) == pytest.approx([3.0] * 5)
    falling = [5.0 - 0.1 * t for t in range(40)]
    smoothed = train.smooth(falling, beta=0.9)
    assert smoothed[0] == pytest.approx(5.0)
    # Adam's bias correction: an EMA from 0 divided by 1 - beta^t (not one that starts at the first value)
    assert smoothed[1] == pytest.approx((0.9 * 0.1 * 5.0 + 0.1 * 4.9) / (1 - 0.9**2))
    # on a straight line the debiased EMA trails by at most beta / (1 - beta) steps of its slope
    assert all(0 <= s - v <= 0.1 * 9 + 1e-9 for s, v in zip(smoothed, falling))


def test_loss_plot_labels_every_curve_and_puts_the_settings_in_the_title(run):
    cfg, results = run
    fig = train.loss_figure(results, cfg, entropy=3.1, params=26_720)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for name in ("adamw", "lion"):
        assert {f"{name} train (raw)", f"{name} held-out"} <= set(lines)
        assert any(label.startswith(f"{name} train (EMA") and "debiased" in label for label in lines)
        assert lines[f"{name} held-out"].get_xdata()[0] == 0
    assert set(ax.get_legend().get_texts()[i].get_text() for i in range(len(lines))) == set(lines)
    title = ax.get_title()
    for words in ("0.03 M parameters", "60 steps", "cosine schedule", "warmup 6", "adamw lr 0.003", "lion lr 0.0003"):
        assert words in title, title


def test_lr_plot_is_linear_with_warmup_and_end_marked(run):
    cfg, results = run
    fig = train.lr_figure(results, cfg)
    assert len(fig.axes) == 2
    for ax, peak in zip(fig.axes, (3e-3, 3e-4)):
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
        marks = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()}
        assert marks["end of warmup (step 6)"] == 6 and marks["end (step 60)"] == 60
        assert math.isclose(max(ax.get_lines()[0].get_ydata()), peak)


def test_lr_plot_draws_muons_matrices_and_its_adamw_each_from_its_peak(run):
    """Muon's groups step under one schedule from two peaks: one curve each, labelled with its peak,
    the second the first scaled by the ratio of the peaks (the scheduler's multiplier is shared)."""
    cfg, results = run
    lrs = results["adamw"]["history"]["lr"]
    muon = {"history": {**results["adamw"]["history"], "lr": [x * 0.02 / 3e-3 for x in lrs]},
            "peak_lrs": {"muon": 0.02, "adamw": 3e-3}}
    fig = train.lr_figure({**results, "muon": muon}, {**cfg, "optimizers": ["adamw", "lion", "muon"]})
    assert len(fig.axes) == 3
    curves = {line.get_label(): line.get_ydata() for line in fig.axes[2].get_lines()}
    assert math.isclose(max(curves["muon: matrices (Muon) (peak 0.02)"]), 0.02)
    scaled = curves["muon: other tensors (AdamW) (peak 0.003)"]
    assert all(math.isclose(a, b) for a, b in zip(scaled, lrs))
    assert "adamw (peak 0.003)" in {line.get_label() for line in fig.axes[0].get_lines()}  # one group: one curve


def test_loss_plot_title_says_the_precision_when_it_is_not_fp32_and_fits_the_figure(run):
    def title(cfg):
        fig = train.loss_figure(results, cfg, entropy=3.1)
        text = fig.axes[0].get_title()
        fig.canvas.draw()  # the title's drawn width within the figure's: not cut off at either edge
        box = fig.axes[0].title.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox)
        return " ".join(text.split("\n"))

    cfg, results = run
    assert "params" not in title(cfg) and "states" not in title(cfg)
    low = {**cfg, "param_dtype": "bf16", "stochastic_rounding": True, "state_dtype": "uint8"}
    assert "bf16 params (stochastic rounding, no fp32 master copy), 8-bit states" in title(low)
    nearest = title({**low, "stochastic_rounding": False, "state_dtype": "fp32"})
    assert "bf16 params (round to nearest, no fp32 master copy)" in nearest and "states" not in nearest

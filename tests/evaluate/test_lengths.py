"""Report lengths: KDE, KL divergence, plot."""

from __future__ import annotations

import numpy as np
import pytest

from rrg3d.evaluate.lengths import kl_divergence, length_analysis, plot_lengths, word_counts


def test_kl_of_identical_distributions_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(200, 40, 500)
    assert kl_divergence(reference, reference) == pytest.approx(0.0, abs=1e-9)
    near = kl_divergence(reference, rng.normal(205, 40, 500))
    far = kl_divergence(reference, rng.normal(100, 20, 500))
    assert 0 <= near < 0.1 < far


def test_degenerate_and_empty_samples():
    assert kl_divergence(np.full(10, 50.0), np.full(10, 50.0)) == pytest.approx(0.0, abs=1e-9)
    assert kl_divergence(np.array([50.0]), np.array([80.0])) > 1.0
    assert kl_divergence(np.array([]), np.array([1.0])) is None
    out = length_analysis(word_counts(["a b c", "a b"]), word_counts(["a", ""]))
    assert out["reference"]["mean"] == 2.5 and out["generated"]["min"] == 0.0
    assert out["kl_divergence"] > 0


def test_plot_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    path = plot_lengths(rng.normal(200, 30, 100), {"model": rng.normal(150, 20, 100), "empty": np.array([])},
                        tmp_path / "lengths.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

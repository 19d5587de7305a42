"""`profile plot`: one figure with a role map, a stability heatmap and cluster sizes."""

import pytest

from heterocache.profile.testing import toy_profile

pytest.importorskip("matplotlib")


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_plot_writes_a_png_with_three_panels(tmp_path):
    from heterocache.profile.plot import plot_profile

    fig = plot_profile(toy_profile(), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"Roles (satellite: index of its pivot)", "Stability", "Cluster sizes"} <= set(titles(fig))


def test_profiles_without_stability_show_budget_ratios_instead(tmp_path):
    from heterocache.profile.plot import plot_profile

    fig = plot_profile(toy_profile(has_stability=False), tmp_path / "p.png")
    assert "No stability scores: budget ratios" in titles(fig)

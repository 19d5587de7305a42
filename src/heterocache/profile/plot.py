"""One figure, three panels: role map, stability heatmap, cluster sizes (``heterocache profile plot``).

Needs matplotlib (``pip install "heterocache[plot]"``); uses the non-interactive Agg backend.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .._optional import require_matplotlib
from .head_profile import HeadProfile
from .roles import Role

#: One colour per role (colour-blind friendly, Okabe-Ito).
ROLE_COLOURS = {Role.ANCHOR: "#0072B2", Role.VOLATILE: "#D55E00", Role.PIVOT: "#CC79A7", Role.SATELLITE: "#B5DDA4"}


def plot_profile(profile: HeadProfile, out: str | Path | None = None, *, dpi: int = 130) -> Any:
    """Draw the profile; save it to ``out`` (PNG, PDF, ... by suffix) when given.

    Returns:
        The matplotlib Figure.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    matplotlib = require_matplotlib("the profile plot")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    layers, heads = profile.num_layers, profile.num_kv_heads
    height = min(14.0, max(4.5, 0.2 * layers + 2.2))
    width = max(heads, 3)
    fig, (ax_roles, ax_stab, ax_hist) = plt.subplots(
        1, 3, figsize=(max(11.0, 2.5 + 1.1 * width), height),
        gridspec_kw={"width_ratios": [width, width * 1.3, width * 0.9 + 1]},
    )

    # Role map: layers down, KV heads across; satellites show the index of their pivot.
    cmap = ListedColormap([ROLE_COLOURS[r] for r in Role])
    ax_roles.imshow(profile.roles.numpy() - 1, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest")
    if layers * heads <= 800:
        for layer in range(layers):
            for head in range(heads):
                role = profile.role_of(layer, head)
                text = str(profile.pivot_of(layer, head)) if role is Role.SATELLITE else role.letter
                ax_roles.text(head, layer, text, ha="center", va="center", fontsize=6.5,
                              color="white" if role in (Role.ANCHOR, Role.VOLATILE) else "black")
    _axes(ax_roles, layers, heads, "Roles (satellite: index of its pivot)")
    ax_roles.legend(handles=[Patch(color=ROLE_COLOURS[r], label=f"{r.label} ({n})")
                             for r, n in zip(Role, profile.counts().values())],
                    loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=8, frameon=False)

    # Stability heatmap.
    if profile.has_stability:
        image = ax_stab.imshow(profile.stability.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                               interpolation="nearest")
        bar = fig.colorbar(image, ax=ax_stab, fraction=0.1, pad=0.03, aspect=35)
        bar.set_label("stability S (median top-k overlap)", fontsize=8)
        if profile.tau_stable is not None:
            bar.ax.axhline(profile.tau_stable, color="white", lw=1.5)
            bar.ax.text(1.6, profile.tau_stable, "τ", va="center", fontsize=8, transform=bar.ax.get_yaxis_transform())
        _axes(ax_stab, layers, heads, "Stability")
    else:
        # Converted profiles have no stability scores; their budget ratios (proportional to
        # 1/S among compressed heads) are the closest thing, so show those instead.
        cmap_ratio = matplotlib.colormaps["magma"].with_extremes(bad="#dddddd")
        image = ax_stab.imshow(profile.budget_ratios.numpy(), cmap=cmap_ratio, aspect="auto", interpolation="nearest")
        bar = fig.colorbar(image, ax=ax_stab, fraction=0.1, pad=0.03, aspect=35)
        bar.set_label("budget ratio (grey: full head)", fontsize=8)
        _axes(ax_stab, layers, heads, "No stability scores: budget ratios")

    # Cluster sizes: 1 = unique heads (anchor, volatile), >= 2 = pivot + satellites.
    sizes = Counter(profile.cluster_sizes())
    counts = profile.counts()
    xs = list(range(1, heads + 1))
    ax_hist.bar([1], [counts["anchor"]], color=ROLE_COLOURS[Role.ANCHOR], label="unique: anchor")
    ax_hist.bar([1], [counts["volatile"]], bottom=[counts["anchor"]], color=ROLE_COLOURS[Role.VOLATILE],
                label="unique: volatile")
    ax_hist.bar(xs[1:], [sizes.get(x, 0) for x in xs[1:]], color=ROLE_COLOURS[Role.PIVOT], label="clusters")
    for x in xs:
        value = counts["anchor"] + counts["volatile"] if x == 1 else sizes.get(x, 0)
        if value:
            ax_hist.text(x, value, str(value), ha="center", va="bottom", fontsize=8)
    ax_hist.set_xticks(xs)
    ax_hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_hist.set_xlabel("heads in group\n(pivot + satellites; 1 = unique head)")
    ax_hist.set_ylabel("number of groups")
    ax_hist.set_title("Cluster sizes", fontsize=10)
    top = max([counts["anchor"] + counts["volatile"], *sizes.values(), 1])
    ax_hist.set_ylim(0, top * 1.3)  # headroom for the legend
    ax_hist.legend(fontsize=8, frameon=False, loc="upper left")
    ax_hist.spines[["top", "right"]].set_visible(False)

    settings = f"top-k {profile.topk}, τ_stable {profile.tau_stable}, τ_sim {profile.tau_sim}"
    fig.suptitle(f"{profile.model_name} — {layers} layers × {heads} KV heads ({settings})", fontsize=11)
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    return fig


def _axes(ax: Any, layers: int, heads: int, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    step = 1 if layers <= 16 else 2 if layers <= 32 else 4
    ax.set_yticks(range(0, layers, step))
    ax.tick_params(labelsize=8)

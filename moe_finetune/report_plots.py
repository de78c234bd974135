"""The run report's plots: one function per figure, parsed run data in, a matplotlib `Figure` out.

Object API on the Agg canvas (`Figure.savefig` picks it for PNG), no pyplot and no global state, so no
display is needed and figures never leak between reports. `moe_finetune.report` parses the run directory
and calls these from `write_report`, the one place that writes them; this module is imported only then,
so `import moe_finetune.report` (the guard's halt path, the CLI) does not pay for matplotlib.

Layout, chosen to stay readable from 2 layers to 48 layers x 128 experts: the per-layer panels (load
heatmap, final load) show every layer up to `MAX_LAYER_PANELS`, in model order; beyond that, the layers
whose balance fell most below their own start, worst first (a person looks for the layers that went
wrong; 48 panels of 128 rows are a texture, not a picture). The entropy plot draws one line per layer up
to the same count and, beyond it, one layer x step heatmap per entropy, which shows all 48 at once.
Every plot over steps marks the guard's cuts, halt, settled and resume steps the same way (MARKERS).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_finetune.report import (
    DEFAULT_BASELINE_STEPS,
    MAX_LAYER_PANELS,
    RoutingSeries,
    RunData,
    Start,
    format_value,
    quiet_nan_warnings,
    run_status,
    worst_first,
)

DPI = 100
WIDTH = 11.0  # inches: 1100 px at DPI 100

# How each guard action is drawn on every plot over steps: (colour, line style, width, legend label).
MARKERS = {
    "cut_lr": ("#d95f02", "--", 1.6, "learning-rate cut"),
    "halt": ("black", "-", 2.2, "halt"),
    "settled": ("#1b9e77", ":", 2.0, "settled"),
    "resume": ("#7570b3", "-.", 1.4, "resumed"),
    "interrupted": ("#7570b3", "-", 2.0, "interrupted"),
}


def event_steps(run: RunData) -> dict[str, list[int]]:
    """Steps to mark on every plot over steps, by marker kind (MARKERS)."""
    marks: dict[str, list[int]] = {kind: [] for kind in MARKERS}
    for event in run.events:
        action, step = event.get("action"), event.get("step")
        if not isinstance(step, int) or not isinstance(action, str):
            continue
        kind = "resume" if action.startswith("resume") else action
        if kind in marks and step not in marks[kind]:
            marks[kind].append(step)
    if run_status(run) == "interrupted" and run.last_step is not None:
        marks["interrupted"].append(run.last_step)
    return marks


def _panels(
    rows: int,
    cols: int,
    panel_height: float,
    *,
    colorbar: bool = False,
    legend: bool = False,
    sharex: bool = False,
    gap: float = 0.65,
    right_axis: bool = False,
) -> tuple[Any, list[Any]]:
    """A figure of rows x cols axes with fixed margins in inches (a computed layout: matplotlib's
    constrained layout measures every tick label, which was a third of a report's time on 16 layers).

    Room is left for a title on each panel, the figure title at the top, a colour bar on the right and
    one legend of the guard's markers at the bottom. Returns the figure and its axes, row by row.
    """
    from matplotlib.figure import Figure

    top, bottom, left = 0.55, 0.55 + (0.35 if legend else 0.0), 0.85
    right = 1.35 if colorbar else 0.7 if right_axis else 0.3  # right_axis: tick labels of a twinx
    height = top + bottom + rows * panel_height + (rows - 1) * gap
    column_gap = 0.75
    panel_width = (WIDTH - left - right - (cols - 1) * column_gap) / cols
    fig = Figure(figsize=(WIDTH, height), dpi=DPI)
    axes = fig.subplots(
        rows,
        cols,
        squeeze=False,
        sharex=sharex,
        gridspec_kw={
            "left": left / WIDTH,
            "right": 1 - right / WIDTH,
            "top": 1 - top / height,
            "bottom": bottom / height,
            "hspace": gap / panel_height,
            "wspace": column_gap / panel_width,
        },
    )
    return fig, [ax for row in axes for ax in row]


def _colorbar(
    fig: Any, image: Any, label: str, axes: Sequence[Any] | None = None, extend: str = "neither"
) -> None:
    """A colour bar in the right margin `_panels(colorbar=True)` keeps, as tall as `axes` (default: all)."""
    boxes = [ax.get_position() for ax in (axes or fig.axes) if ax.get_visible()]
    bottom, top = min(box.y0 for box in boxes), max(box.y1 for box in boxes)
    cax = fig.add_axes((1 - 1.05 / WIDTH, bottom, 0.18 / WIDTH, top - bottom))
    fig.colorbar(image, cax=cax, label=label, extend=extend)


def _title(fig: Any, text: str) -> None:
    fig.suptitle(text, fontsize=11, y=1 - 0.18 / fig.get_figheight(), va="top")


def _grid(count: int, panel_height: float, **kwargs: Any) -> tuple[Any, list[Any]]:
    """Small multiples: one column up to 3 panels, two beyond (8 layers = 4 rows)."""
    cols = 1 if count <= 3 else 2
    fig, axes = _panels(math.ceil(count / cols), cols, panel_height, **kwargs)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _short(name: str) -> str:
    return name.removeprefix("model.")


def _mark(ax: Any, marks: dict[str, list[int]], x_of: Any = None) -> None:
    """Vertical lines at the guard's actions (x_of maps a step to the axis' x, for heatmap columns)."""
    for kind, steps in marks.items():
        colour, style, width, label = MARKERS[kind]
        for i, step in enumerate(steps):
            x = x_of(step) if x_of is not None else step
            ax.axvline(
                x, color=colour, linestyle=style, linewidth=width, label=label if i == 0 else None, zorder=3
            )


def _legend_for_marks(fig: Any, marks: dict[str, list[int]], extra: Sequence[Any] = ()) -> None:
    """One legend at the bottom: the guard's markers (and `extra` handles, e.g. the layers' lines)."""
    from matplotlib.lines import Line2D

    handles = list(extra) + [
        Line2D(
            [],
            [],
            color=MARKERS[kind][0],
            linestyle=MARKERS[kind][1],
            linewidth=MARKERS[kind][2],
            label=MARKERS[kind][3],
        )
        for kind, steps in marks.items()
        if steps
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.05 / fig.get_figheight()),
            ncol=min(len(handles), 7),
            fontsize=8,
            frameon=False,
        )


def _step_axis(ax: Any, series: RoutingSeries) -> None:
    """Label a heatmap's record columns with round training steps (columns are logging steps, in order)."""
    from matplotlib.ticker import MaxNLocator

    steps = series.steps.astype(float)
    if len(steps) <= 16:  # few columns: each one's own step
        ax.set_xticks(np.arange(len(steps)), [str(int(v)) for v in steps])
        return
    values = MaxNLocator(nbins=8, integer=True).tick_values(steps[0], steps[-1])
    values = values[(values >= steps[0]) & (values <= steps[-1])]
    ax.set_xticks(np.interp(values, steps, np.arange(len(steps))), [str(int(v)) for v in values])


def _layer_axis(ax: Any, series: RoutingSeries) -> None:
    """Label a layer heatmap's rows with the model's layer numbers (layers.N), not their index in the file."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    numbers = [_layer_number(name, i) for i, name in enumerate(series.layer_names)]
    ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.yaxis.set_major_formatter(
        FuncFormatter(lambda y, _pos: str(numbers[int(round(y))]) if 0 <= round(y) < len(numbers) else "")
    )


def _layer_number(name: str, index: int) -> int:
    found = re.search(r"layers?\.(\d+)", name)
    return int(found.group(1)) if found else index


def _start_of(series: RoutingSeries, start: Start | None) -> Start:
    """The start given, or (a figure drawn without one) the mean of the guard's default baseline windows."""
    return start if start is not None else Start.of_windows(series, DEFAULT_BASELINE_STEPS)


def _layer_title(series: RoutingSeries, layer: int, start: Start) -> str:
    begin = start.balance[layer]
    end = series.balance[-1, layer]
    ratio = series.load_ratio[-1, layer]
    busiest = int(np.nanargmax(ratio)) if np.isfinite(ratio).any() else None
    peak = f", top: expert {busiest} at {ratio[busiest]:.1f}x" if busiest is not None else ""
    balance = f"{format_value(begin, '.2f')} \u2192 {format_value(end, '.2f')}"
    return f"{_short(series.layer_names[layer])}: balance {balance}{peak}"


def _shown_words(series: RoutingSeries, layers: list[int]) -> str:
    if len(layers) == series.num_layers:
        return f"all {series.num_layers} MoE layers"
    return f"the {len(layers)} of {series.num_layers} MoE layers whose balance fell most, worst first"


def _load_scale(series: RoutingSeries, layers: list[int]) -> tuple[Any, Any, float]:
    """The colours of load x E, shared by the heatmap and the bars: white at uniform, blue to 0, red above.

    Past 4x uniform is collapse whatever the number (the guard's default load limit is 3x): the scale stops
    there, so the moderate overloads of a healthy run still show and one outlier does not wash them out.
    Returns the colour map, its norm and the largest value shown.
    """
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    ratio = series.load_ratio[:, layers]
    with quiet_nan_warnings():
        top = float(np.nanmax(ratio)) if np.isfinite(ratio).any() else 2.0
    return colormaps["RdBu_r"], TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=min(4.0, max(2.0, top))), top


def load_share_figure(
    series: RoutingSeries,
    layers: list[int],
    marks: dict[str, list[int]],
    start: Start | None = None,
) -> Any:
    """Heatmap per layer: expert (rows) x logging step (columns), load share x E on a scale centred on uniform.

    White is uniform (1x), red an expert taking more than its share, blue one starving (0 = dead); every
    panel shares one colour scale, so layers compare directly. Collapse is a row turning red while the
    others turn blue.
    """
    start = _start_of(series, start)
    fig, panels = _grid(len(layers), 2.1, colorbar=True, legend=any(marks.values()))
    ratio = series.load_ratio
    cmap, norm, top = _load_scale(series, layers)
    experts = series.num_experts
    image = None
    for ax, layer in zip(panels, layers, strict=True):
        image = ax.imshow(
            ratio[:, layer, :].T,
            aspect="auto",
            origin="lower",
            cmap=cmap,
            norm=norm,
            interpolation="antialiased",
            extent=(-0.5, len(series.steps) - 0.5, -0.5, experts - 0.5),
        )
        _mark(ax, marks, series.column_of)
        _step_axis(ax, series)
        if experts <= 16:
            ax.set_yticks(range(experts))
        ax.set_ylabel("expert")
        ax.set_title(_layer_title(series, layer, start), fontsize=9, loc="left")
    for ax in panels[-(2 if len(panels) > 3 else 1) :]:
        ax.set_xlabel("step")
    _colorbar(
        fig, image, "load share x E   (1 = uniform, 0 = dead)", extend="max" if top > 4.0 else "neither"
    )
    _legend_for_marks(fig, marks)
    _title(fig, f"Expert load over training: {_shown_words(series, layers)}")
    return fig


def final_load_figure(
    series: RoutingSeries,
    layers: list[int],
    start_of_run: Start | None = None,
    dead_line: float = 0.1,
) -> Any:
    """Bars per layer: each expert's load x E at the last logging step, busiest first, against uniform (1x).

    Sorted so the shape reads at a glance for 8 or 128 experts (a flat row of bars is balanced, a few tall
    ones and a tail near zero is collapse); coloured as in the load heatmap (white near uniform, red over,
    blue under); dots give the same expert's load at the start, crosses mark the dead.
    """
    from matplotlib.collections import PolyCollection

    begin = _start_of(series, start_of_run)
    fig, panels = _grid(len(layers), 1.9, legend=True)
    ratio = series.load_ratio
    start = begin.load_ratio  # (L, E)
    cmap, norm, _top = _load_scale(series, layers)
    experts = series.num_experts
    x = np.arange(experts)
    half = 0.42 if experts <= 32 else 0.5
    for ax, layer in zip(panels, layers, strict=True):
        final = np.nan_to_num(ratio[-1, layer], nan=0.0)
        order = np.argsort(-final, kind="stable")
        ranked = final[order]
        # one collection of rectangles, not a patch per bar: 8 panels of 128 experts draw in no time
        bars = [
            ((i - half, 0.0), (i - half, v), (i + half, v), (i + half, 0.0)) for i, v in enumerate(ranked)
        ]
        ax.add_collection(
            PolyCollection(
                bars,
                facecolors=cmap(norm(ranked)),
                edgecolors="#555555",
                linewidths=0.4 if experts <= 32 else 0,
            )
        )
        dead = ranked < dead_line
        if dead.any():
            ax.plot(
                x[dead],
                np.zeros(int(dead.sum())),
                "x",
                color="#2166ac",
                markersize=6,
                clip_on=False,
                zorder=4,
            )
        ax.plot(x, start[layer][order], "k.", markersize=3 if experts > 32 else 7)
        ax.axhline(1.0, color="black", linewidth=1.0)
        ax.axhline(dead_line, color="#2166ac", linewidth=0.8, linestyle=":")
        ax.set_xlim(-0.6, experts - 0.4)
        with quiet_nan_warnings():
            highest = float(np.nanmax([ranked.max(), np.nanmax(start[layer]), 1.0]))
        ax.set_ylim(0, highest * 1.08)
        if experts <= 32:
            ax.set_xticks(x, [str(e) for e in order], fontsize=8)
            ax.set_xlabel("expert (busiest first)", fontsize=9)
        else:
            ax.set_xticks([])
            busiest = ", ".join(str(e) for e in order[:3])
            ax.set_xlabel(f"{experts} experts, busiest first (busiest: {busiest})", fontsize=9)
        ax.set_ylabel("load x E")
        ax.set_title(_layer_title(series, layer, begin), fontsize=9, loc="left")
    from matplotlib.lines import Line2D

    key = [
        Line2D([], [], color="black", linewidth=1.0, label="uniform (1x)"),
        Line2D([], [], color="#2166ac", linewidth=0.8, linestyle=":", label=f"dead line ({dead_line:g}x)"),
        Line2D([], [], color="#2166ac", marker="x", linestyle="", label="dead now"),
        Line2D(
            [], [], color="black", marker=".", linestyle="", markersize=7, label="same expert at the start"
        ),
    ]
    fig.legend(
        handles=key,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.05 / fig.get_figheight()),
        ncol=len(key),
        fontsize=8,
        frameon=False,
    )
    _title(
        fig, f"Expert load at step {int(series.steps[-1])} against uniform: {_shown_words(series, layers)}"
    )
    return fig


def entropy_figure(
    series: RoutingSeries,
    marks: dict[str, list[int]],
    start: Start | None = None,
    halt_balance_drop: float | None = None,
) -> Any:
    """Both entropies the guard watches, per layer, over steps, with its cuts and halt marked.

    Routing entropy (per token) falls when routers get confident, which healthy specialisation also does;
    balance (of the load share) falls when the load concentrates on few experts, which is collapse. Up to
    MAX_LAYER_PANELS layers: a line each, and a dotted line at each layer's start, the guard's baseline
    (measured before the first update, it is also a point at step 0; with up to 4 layers, a dashed line
    where the guard halts on balance, `halt_balance_drop` below it); beyond: a layer x step heatmap per
    entropy, every layer visible.
    """
    start = _start_of(series, start)
    lines = series.num_layers <= MAX_LAYER_PANELS
    fig, axes = _panels(2, 1, 2.6, colorbar=not lines, legend=True, sharex=lines)
    panels = [
        (axes[0], series.entropy, start.entropy, "routing entropy (per token, normalised)"),
        (axes[1], series.balance, start.balance, "balance (entropy of the load share)"),
    ]
    halt_line = halt_balance_drop is not None and series.num_layers <= 4
    if lines:
        handles = []
        for ax, values, begin, label in panels:
            handles = []
            for layer in range(series.num_layers):
                (line,) = ax.plot(
                    series.steps,
                    values[:, layer],
                    marker="." if len(series.steps) <= 60 else None,
                    linewidth=1.4,
                    color=f"C{layer}",
                    label=_short(series.layer_names[layer]),
                )
                handles.append(line)
            for layer, value in enumerate(begin):
                if np.isfinite(value):
                    ax.axhline(value, color=f"C{layer}", linewidth=0.8, linestyle=(0, (1, 3)))
                    if start.before_training:
                        ax.plot([0], [value], marker="o", fillstyle="none", color=f"C{layer}", linestyle="")
                    if values is series.balance and halt_line:
                        ax.axhline(
                            value * (1 - halt_balance_drop), color=f"C{layer}", linewidth=0.8, linestyle="--"
                        )
            _mark(ax, marks)
            ax.set_title(label, fontsize=9, loc="left")
            ax.grid(alpha=0.3)
        if start.before_training:
            from matplotlib.lines import Line2D

            handles = [
                *handles,
                Line2D([], [], color="grey", marker="o", fillstyle="none", linestyle="", label="start (before step 1)"),
            ]
        _legend_for_marks(fig, marks, handles)
        title = "Routing entropy and balance per layer (dotted: each layer's start, the guard's baseline"
        title += f"; dashed: its balance halt, {halt_balance_drop:.0%} below)" if halt_line else ")"
    else:
        for ax, values, _begin, label in panels:
            # each entropy on its own range (balance lives near 1, routing entropy lower): a drop must show
            with quiet_nan_warnings():
                low, high = np.nanmin(values), np.nanmax(values)
            low = math.floor(low * 20) / 20 if math.isfinite(low) else 0.0
            high = max(low + 0.05, math.ceil(high * 20) / 20 if math.isfinite(high) else 1.0)
            image = ax.imshow(
                values.T,
                aspect="auto",
                origin="lower",
                cmap="viridis",
                vmin=low,
                vmax=high,
                interpolation="antialiased",
                extent=(-0.5, len(series.steps) - 0.5, -0.5, series.num_layers - 0.5),
            )
            _mark(ax, marks, series.column_of)
            _step_axis(ax, series)
            _layer_axis(ax, series)
            ax.set_ylabel("layer")
            ax.set_title(label + " (dark = low)", fontsize=9, loc="left")
            _colorbar(fig, image, "normalised entropy", axes=[ax])
        _legend_for_marks(fig, marks)
        worst = ", ".join(_short(series.layer_names[i]) for i in worst_first(series, start)[:3])
        title = f"Routing entropy and balance of all {series.num_layers} layers (balance fell most: {worst})"
    axes[1].set_xlabel("step")
    _title(fig, title)
    return fig


def training_figure(
    steps: np.ndarray,
    lr: np.ndarray,
    loss: np.ndarray,
    marks: dict[str, list[int]],
    series: RoutingSeries | None = None,
    retention: tuple[np.ndarray, np.ndarray] | None = None,
) -> Any:
    """Learning rate (with the guard's cuts), training loss (and the retention loss, on its own scale: a
    rise there is forgetting while the training loss falls) and routing drift over steps."""
    with_retention = retention is not None and bool(np.isfinite(retention[1]).any())
    fig, axes = _panels(3, 1, 1.75, legend=any(marks.values()), sharex=True, gap=0.35, right_axis=with_retention)
    ax_lr, ax_loss, ax_drift = axes
    dots = "." if len(steps) <= 60 else None
    # a record's rate is the one its logging window trained at (the guard cuts at the window's end)
    ax_lr.step(steps, lr, where="pre", color="C0", linewidth=1.6, marker=dots)
    for i, step in enumerate(marks.get("cut_lr", [])):
        ax_lr.annotate(
            f"cut {i + 1}",
            (step, 0.06),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            xytext=(4, 0),
            textcoords="offset points",
            color=MARKERS["cut_lr"][0],
        )
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    (trained,) = ax_loss.plot(steps, loss, color="C1", marker=dots, label="training loss")
    ax_loss.set_ylabel("training loss")
    if with_retention:
        from matplotlib.ticker import FormatStrFormatter

        ax_kept = ax_loss.twinx()
        (kept,) = ax_kept.plot(
            retention[0], retention[1], color="C2", marker=".", linewidth=1.2, label="retention loss (right axis)"
        )
        ax_kept.tick_params(axis="y", colors="C2", labelsize=8)
        ax_kept.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        ax_kept.legend(handles=[trained, kept], fontsize=8, loc="best", framealpha=0.85)  # above both lines
    if series is not None and np.isfinite(series.drift).any():
        keep = np.isfinite(series.drift)
        ax_drift.plot(series.steps[keep], series.drift[keep], "k.-", label="all layers", linewidth=1.6)
        if series.num_layers <= MAX_LAYER_PANELS:
            for layer in range(series.num_layers):
                ax_drift.plot(
                    series.steps[keep],
                    series.layer_drift[keep, layer],
                    marker=".",
                    linewidth=0.9,
                    color=f"C{layer}",
                    alpha=0.8,
                    label=_short(series.layer_names[layer]),
                )
        ax_drift.set_ylim(0, 1)
        ax_drift.legend(fontsize=8, loc="lower right", ncol=5)
    else:
        ax_drift.text(
            0.5,
            0.5,
            "no drift measured (monitor.probe_size 0, or no probe batch)",
            ha="center",
            va="center",
            transform=ax_drift.transAxes,
            fontsize=9,
        )
    ax_drift.set_ylabel("drift (top-k changed\nsince the start)", fontsize=9)
    ax_drift.set_xlabel("step")
    for ax in axes:
        _mark(ax, marks)
        ax.grid(alpha=0.3)
    _legend_for_marks(fig, marks)
    _title(fig, "Learning rate, loss and routing drift")
    return fig


def compare_figure(runs: Sequence[RunData], labels: Sequence[str]) -> Any:
    """Two (or more) runs side by side on the numbers the guard acts on: lowest layer balance and routing
    entropy, largest expert load, training loss; each run's guard actions marked in its colour."""
    fig, axes = _panels(2, 2, 2.4, sharex=True, legend=True)
    panels = [
        (axes[0], "lowest layer balance", lambda s: np.nanmin(s.balance, axis=1)),
        (axes[1], "lowest layer routing entropy", lambda s: np.nanmin(s.entropy, axis=1)),
        (axes[2], "busiest expert (x uniform)", lambda s: np.nanmax(s.load_ratio, axis=(1, 2))),
        (axes[3], "training loss", lambda s: s.loss),
    ]
    handles = []
    for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
        colour = f"C{index}"
        marks = event_steps(run)
        for ax, _title_text, values in panels:
            if run.series is None:
                continue
            with quiet_nan_warnings():
                (line,) = ax.plot(
                    run.series.steps, values(run.series), color=colour, linewidth=1.5, label=label
                )
            for kind in ("cut_lr", "halt"):
                for step in marks[kind]:
                    ax.axvline(
                        step,
                        color=colour,
                        linestyle=MARKERS[kind][1],
                        linewidth=MARKERS[kind][2] * 0.7,
                        alpha=0.8,
                    )
        if run.series is not None:
            handles.append(line)
    for ax, title, _values in panels:
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    from matplotlib.lines import Line2D

    handles += [
        Line2D([], [], color="grey", linestyle=MARKERS["cut_lr"][1], label="its learning-rate cuts"),
        Line2D([], [], color="grey", linestyle=MARKERS["halt"][1], linewidth=1.5, label="its halt"),
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.05 / fig.get_figheight()),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    _title(fig, "Side by side")
    return fig


def save_figure(figure: Any, path: Path) -> Path:
    """Write a figure as PNG; a reader never sees half a file (written beside it, then renamed)."""
    from moe_finetune.rundir import unique_sibling

    temporary = unique_sibling(path, ".tmp.png")
    try:
        # zlib level 1: a quarter less time than the default 6 on a 1,000-step heatmap, files ~10% larger
        figure.savefig(temporary, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path

"""Pictures for the dense AVEL task (untrimmed videos, UnAV-100 layout) only: by-products to look at, never results.

Nothing here is read back by training or evaluation; numbers come from `pipeline.dense.evaluate`. The house style
is `pipeline.ave.plots` (object API with the Agg backend, no `pyplot`; the same class palette; atomic PNG writes),
whose helpers are reused rather than repeated.

- `assign_lanes(events)`: a lane per event so that events overlapping in time never share one (greedy, deterministic).
- `timeline_png(path, duration, predictions, class_names, ...)`: one video's predicted events in lanes over time,
  coloured by class, opacity by score, with the ground truth in a panel above when given.
- `curves_png(history, path)`: training losses per epoch and the validation average mAP (%) per epoch.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # a no-op when another backend was chosen on purpose before us
import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, MaxNLocator  # noqa: E402

from pipeline.ave.plots import _fits, _num, _save, _short, class_colors  # noqa: E402

LANE_IN = 0.32  # inches per lane while the panel stays under MAX_PANEL_IN
MAX_PANEL_IN = 24.0  # a panel never grows past this: lanes get thinner instead (labels then drop out)
LOSS_KEYS = ("loss", "cls_loss", "reg_loss", "lcf_loss")


# ---- lanes --------------------------------------------------------------------------------------------------------
def _segment(event: Mapping[str, Any]) -> tuple[float, float]:
    seg = event["segment"]
    start, end = float(seg[0]), float(seg[1])
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"event segment {list(seg)!r} is not two finite numbers")
    return (start, end) if start <= end else (end, start)  # an end before its start is drawn as its span


def assign_lanes(events: Sequence[Mapping[str, Any]]) -> list[int]:
    """A lane index per event (in input order): events that overlap in time never share a lane.

    Events are taken by start time (ties: by end, then input order) and each goes to the lowest-numbered lane that
    is free at its start. Touching events (one ends exactly where the next starts) share a lane when both have
    positive length; a zero-length event (an instant) is kept apart from anything it touches, so it stays visible.
    A segment given end-first is read as its span. Deterministic: the same events give the same lanes.
    """
    spans = [_segment(e) for e in events]
    order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1], i))
    lane_end: list[float] = []  # the end of each lane's last event (its latest end: lane events do not overlap)
    lane_instant: list[bool] = []  # whether that last event has zero length
    lanes = [0] * len(spans)
    for i in order:
        start, end = spans[i]
        instant = end == start
        for k, (le, li) in enumerate(zip(lane_end, lane_instant)):
            if le < start or (le == start and not li and not instant):
                break
        else:
            k = len(lane_end)
            lane_end.append(end)
            lane_instant.append(instant)
        lane_end[k], lane_instant[k] = end, instant
        lanes[i] = k
    return lanes


# ---- the timeline -------------------------------------------------------------------------------------------------
def _names(class_names: Sequence[str] | Mapping[int, str]) -> dict[int, str]:
    if isinstance(class_names, Mapping):
        return {int(k): str(v) for k, v in class_names.items()}
    return {i: str(n) for i, n in enumerate(class_names)}


def _palette(names: Mapping[int, str]) -> tuple[list[Any], int]:
    """The colours of `pipeline.ave.plots.class_colors` by class id: class id i -> colours[i % n]."""
    n = max(max(names, default=-1) + 1, 1)
    colors = class_colors([str(i) for i in range(n)])
    return [colors[str(i)] for i in range(n)], n


def _text_color(color: Any, alpha: float) -> str:
    r, g, b = (alpha * c + (1 - alpha) for c in mcolors.to_rgb(color))  # the bar's colour over white
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _opacity(score: float) -> float:
    return 0.3 + 0.7 * float(np.clip(score, 0.0, 1.0)) if math.isfinite(score) else 0.3


def timeline_png(path: Path, duration: float, predictions: Sequence[Mapping[str, Any]],
                 class_names: Sequence[str] | Mapping[int, str],
                 ground_truth: Sequence[Mapping[str, Any]] | None = None,
                 title: str = "", min_score: float = 0.0) -> Path:
    """One video's events on a time axis from 0 to `duration` seconds; writes the PNG atomically, returns `path`.

    predictions: dicts with `segment` [start_s, end_s], `label_id` and `score`; those with score >= `min_score` are
    drawn as bars in lanes (`assign_lanes`), coloured by class id, more opaque (and edged darker) the higher the
    score, labelled "name score" where the bar is wide enough. ground_truth: dicts with `segment` and `label_id`,
    drawn in their own lanes in a panel above, same colours. class_names: a list indexed by label_id or a mapping
    label_id -> name. The figure grows with the number of lanes (within bounds); no events gives an empty panel
    saying so. Events past `duration` widen the axis, and the video's end is marked.
    """
    duration = float(duration)
    if not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"timeline_png: duration must be a positive number of seconds, got {duration!r}")
    names = _names(class_names)
    palette, n_palette = _palette(names)

    def color(label_id: int) -> Any:
        return palette[int(label_id) % n_palette]

    def name(label_id: int) -> str:
        return names.get(int(label_id), f"class {int(label_id)}")

    shown = [p for p in predictions if float(p["score"]) >= min_score]
    shown.sort(key=lambda p: -float(p["score"]))  # stable: of identical spans, the higher score gets the upper lane
    gt = list(ground_truth) if ground_truth is not None else None
    pred_lanes = assign_lanes(shown)
    gt_lanes = assign_lanes(gt) if gt is not None else []
    end_s = max([duration] + [_segment(e)[1] for e in [*shown, *(gt or [])]])

    # geometry: width with the length of the video, height with the lanes
    width = float(np.clip(10 + duration / 30, 12, 24))
    plot_w = width - 2.4

    def panel_in(n_lanes: int) -> float:
        return min(LANE_IN * max(n_lanes, 1), MAX_PANEL_IN) + 0.2

    panels = ([("ground truth", gt, gt_lanes)] if gt is not None else []) + [("predictions", shown, pred_lanes)]
    heights = [panel_in(max(lanes, default=-1) + 1) for _, _, lanes in panels]
    present = sorted({int(e["label_id"]) for e in [*shown, *(gt or [])]})
    legend_cols = 5
    legend_rows = math.ceil(len(present) / legend_cols)
    header = 0.8
    footer = 0.55 + 0.24 * legend_rows
    fig_h = sum(heights) + header + footer + 0.25 * (len(heights) - 1)
    fig = Figure(figsize=(width, fig_h))
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, left=1.7 / width, right=1 - 0.7 / width,
                          top=1 - header / fig_h, bottom=footer / fig_h, hspace=0.25 / (sum(heights) / len(heights)))
    axes = [fig.add_subplot(gs[i]) for i in range(len(heights))]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    px_per_s = plot_w / end_s  # inches per second

    for ax, (label, events, lanes), height in zip(axes, panels, heights):
        n_lanes = max(lanes, default=-1) + 1
        lane_in = (height - 0.2) / max(n_lanes, 1)
        fontsize = float(np.clip(lane_in * 72 * 0.5, 0, 8))
        is_pred = label == "predictions"
        for event, lane in zip(events, lanes):
            start, end = _segment(event)
            lab = int(event["label_id"])
            score = float(event["score"]) if is_pred else 1.0
            alpha = _opacity(score) if is_pred else 1.0
            bar_w = max(end - start, 0.6 / 72 / px_per_s * 2)  # an instant still shows as a thin bar
            ax.add_patch(Rectangle((start, lane + 0.1), bar_w, 0.8, facecolor=color(lab), alpha=alpha,
                                   edgecolor=(0, 0, 0, 0.25 + 0.75 * (alpha if is_pred else 0.4)),
                                   linewidth=0.6 + (1.0 * alpha if is_pred else 0.2)))
            text = f"{_short(name(lab))} {score:.2f}" if is_pred else _short(name(lab))
            if fontsize >= 5 and _fits(text, bar_w * px_per_s, fontsize):
                ax.text(start + bar_w / 2, lane + 0.5, text, ha="center", va="center", fontsize=fontsize,
                        color=_text_color(color(lab), alpha), fontweight="bold", clip_on=True)
        if not events:
            none = "no events" if not is_pred or min_score <= 0 or not predictions else \
                f"no events with score >= {min_score:g} ({len(predictions)} below)"
            ax.text(0.5, 0.5, none, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="#555555")
        ax.set_ylim(max(n_lanes, 1), 0)  # lane 0 on top
        ax.set_yticks([])
        count = f"{len(events)} event{'s' if len(events) != 1 else ''}, {n_lanes} lane{'s' if n_lanes != 1 else ''}"
        ax.set_ylabel(f"{label}\n({count})", rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        if end_s > duration + 1e-9:
            ax.axvspan(duration, end_s, color="#a40000", alpha=0.08, linewidth=0)
            ax.axvline(duration, color="#a40000", linewidth=1)
    if end_s > duration + 1e-9:
        axes[0].text(duration, 1.02, f"video ends at {duration:.2f} s ", transform=axes[0].get_xaxis_transform(),
                     fontsize=7, color="#a40000", ha="right", va="bottom")
    axes[0].set_xlim(0, end_s)
    axes[-1].xaxis.set_major_locator(MaxNLocator(nbins=int(np.clip(plot_w * 1.5, 6, 30)), steps=[1, 2, 2.5, 5, 10]))
    axes[-1].set_xlabel("time (s)", fontsize=9)
    axes[-1].tick_params(axis="x", labelsize=8)
    for ax in axes[:-1]:
        ax.tick_params(axis="x", labelbottom=False, length=0)

    chars = int(width * 72 / (0.6 * 12))
    fig.text(0.5, 1 - 0.12 / fig_h, textwrap.shorten(title or "dense predictions", chars), ha="center", va="top",
             fontsize=12, fontweight="bold")
    subtitle = f"{len(shown)} of {len(predictions)} predictions with score >= {min_score:g}; " \
               f"video {duration:.2f} s; bar opacity and edge: score"
    fig.text(0.5, 1 - 0.45 / fig_h, textwrap.shorten(subtitle, int(chars * 1.35)), ha="center", va="top",
             fontsize=9, color="#333333")
    if present:
        handles = [Patch(facecolor=color(i), edgecolor="#555555", label=f"{i}: {_short(name(i))}") for i in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(legend_cols, len(handles)), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.02 / fig_h))
    return _save(fig, path)


# ---- training curves ----------------------------------------------------------------------------------------------
def _series(history: Sequence[Mapping[str, Any]], key: str, epochs: np.ndarray,
            scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the epochs where `key` is present and a finite number."""
    vals = np.array([_num(h.get(key)) for h in history], dtype=float) * scale
    keep = np.isfinite(vals) & np.isfinite(epochs)
    return epochs[keep], vals[keep]


def curves_png(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Losses per epoch (total, cls, reg, lcf; the learning rate on a right axis) and the validation average mAP
    in % per epoch (best epoch starred) from per-epoch dicts; missing or None values are skipped. Returns `path`."""
    history = list(history)
    if not history:
        raise ValueError("curves_png: no epochs recorded")
    epochs = np.array([_num(h.get("epoch", i + 1)) for i, h in enumerate(history)], dtype=float)
    epochs = np.where(np.isfinite(epochs), epochs, np.arange(1, len(history) + 1))  # no epoch number: position
    fig = Figure(figsize=(13, 4.6))
    gs = fig.add_gridspec(1, 2, left=0.06, right=0.94, top=0.87, bottom=0.24, wspace=0.28)
    ax_l, ax_m = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    ax_m.sharex(ax_l)  # the same epochs under both panels, even where validation ran only on some
    marker = "o" if len(history) <= 30 else None
    msize = 6 if len(history) <= 3 else 3

    plotted = []
    for key in LOSS_KEYS:
        x, y = _series(history, key, epochs)
        if x.size:
            ax_l.plot(x, y, marker=marker, markersize=msize, linewidth=2.2 if key == "loss" else 1.2,
                      color="black" if key == "loss" else None, label=key)
            plotted.append(y)
    if plotted:
        finite = np.concatenate(plotted)
        if np.all(finite > 0) and finite.max() / max(finite.min(), 1e-12) > 50:
            ax_l.set_yscale("log")
    else:
        ax_l.text(0.5, 0.5, "no losses recorded", transform=ax_l.transAxes, ha="center", va="center", color="#555")
    ax_l.set_ylabel("loss")
    ax_l.set_title("training loss (total and terms)", fontsize=11)
    x_lr, lr = _series(history, "lr", epochs)
    if x_lr.size:
        ax_r = ax_l.twinx()
        ax_r.plot(x_lr, lr, color="#7f7f7f", linestyle="--", linewidth=1.0, label="lr (right axis)")
        if np.all(lr > 0) and lr.max() / lr.min() > 50:
            ax_r.set_yscale("log")
        ax_r.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
        ax_r.set_ylabel("learning rate", color="#7f7f7f", fontsize=9)
        ax_r.tick_params(axis="y", labelsize=7, colors="#7f7f7f")
        extra = ax_r.get_legend_handles_labels()
    else:
        extra = ([], [])

    x_m, m = _series(history, "val_avg_map", epochs, scale=100.0)
    if x_m.size:
        ax_m.plot(x_m, m, marker=marker, markersize=msize, color="#2f5597", label="validation average mAP")
        b = int(np.argmax(m))  # ties keep the earlier epoch
        ax_m.plot([x_m[b]], [m[b]], marker="*", markersize=14, color="#2f5597", linestyle="none",
                  markeredgecolor="black", markeredgewidth=0.5, label=f"best: epoch {x_m[b]:g}, {m[b]:.2f} %")
        top = float(m.max())
        ax_m.set_ylim(0, min(100.0, max(5.0, top * 1.15)))
    else:
        ax_m.set_ylim(0, 100)
        ax_m.text(0.5, 0.5, "no validation mAP recorded", transform=ax_m.transAxes, ha="center", va="center",
                  color="#555555")
    ax_m.set_ylabel("average mAP (%, tIoU 0.1:0.9)")
    ax_m.set_title("validation", fontsize=11)

    for ax in (ax_l, ax_m):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(set(epochs.tolist())) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    h, lab = ax_l.get_legend_handles_labels()
    if h or extra[0]:
        ax_l.legend(h + extra[0], lab + extra[1], loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5,
                    fontsize=8, frameon=False)
    if x_m.size:
        ax_m.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"dense training: {len(history)} epoch{'s' if len(history) != 1 else ''}", fontsize=12,
                 fontweight="bold")
    return _save(fig, path)

"""Pictures of what the pipeline did: a prediction timeline per video, training curves, evaluation charts, and the
markdown report that embeds them.

matplotlib with the Agg backend only (no display, safe in workers and under Prefect): figures are built with the
object API (`matplotlib.figure.Figure`), never `pyplot`, so nothing global is touched and nothing leaks between
calls. Every PNG is written atomically. Sizes scale with the content (seconds of video, number of classes) within
fixed bounds, so a 4-s clip and a 10-minute video both give a readable picture of sensible size.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # a no-op when another backend was chosen on purpose before us
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.store import atomic_path  # noqa: E402

BACKGROUND = "background"
BACKGROUND_COLOR = "#d9d9d9"
DPI = 100
MAX_NAME = 24  # characters of a class name on a tick label (full names are in the CSV/JSON and tables)


# ---- helpers ------------------------------------------------------------------------------------------------------
def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    FigureCanvasAgg(fig)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out


def _short(name: str, n: int = MAX_NAME) -> str:
    return name if len(name) <= n else name[:n - 1].rstrip(" ,") + "…"


def class_colors(class_names: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per class (by index, so a class keeps its colour across pictures), grey for background."""
    import matplotlib.colors as mcolors
    from matplotlib import colormaps

    palette = list(colormaps["tab10"].colors) if len(class_names) <= 10 else list(colormaps["tab20"].colors)
    palette = [c for c in palette if not np.allclose(mcolors.to_rgb(c), mcolors.to_rgb("#7f7f7f"), atol=0.02)]
    out = {name: palette[i % len(palette)] for i, name in enumerate(class_names)}
    out[BACKGROUND] = BACKGROUND_COLOR
    return out


def _runs(labels: Sequence[str | None]) -> list[tuple[int, int, str | None]]:
    """[(start, end, label)] of consecutive equal labels."""
    out: list[tuple[int, int, str | None]] = []
    for i, lab in enumerate(labels):
        if out and out[-1][2] == lab:
            out[-1] = (out[-1][0], i + 1, lab)
        else:
            out.append((i, i + 1, lab))
    return out


def _fits(text: str, width_in: float, fontsize: float) -> bool:
    return len(text) * 0.65 * fontsize / 72 <= width_in * 0.92  # bold text: ~0.65 em per character


# ---- the prediction timeline --------------------------------------------------------------------------------------
def _envelope(audio: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    n = audio.size // bins * bins
    if n == 0:
        return audio, audio
    blocks = audio[:n].reshape(bins, -1)
    return blocks.min(1), blocks.max(1)


def _spectrogram(audio: np.ndarray, sample_rate: int, max_frames: int = 1600, n_fft: int = 512):
    """Log power (dB) [freq, frames] of a Hann-windowed STFT, at most `max_frames` frames wide."""
    hop = max(n_fft // 4, math.ceil(max(audio.size - n_fft, 1) / max_frames))
    if audio.size < n_fft:
        audio = np.pad(audio, (0, n_fft - audio.size))
    frames = 1 + (audio.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(audio[idx] * np.hanning(n_fft)[None, :], axis=1)) ** 2
    db = 10 * np.log10(spec.T + 1e-10)
    return db, sample_rate / 2


def timeline_png(path: Path, frames: np.ndarray | None, audio: np.ndarray | None, sample_rate: int,
                 prediction: Any, class_names: Sequence[str], ground_truth: Sequence[str | None] | None = None, *,
                 title: str | None = None, notes: Sequence[str] = (), window_s: int | None = 10,
                 duration_s: float | None = None, audio_note: str | None = None) -> Path:
    """One video's timeline: a strip of frames, the waveform and spectrogram, the predicted events (with event and
    class probability) and, when given, the ground truth.

    frames: uint8 [S, h, w, 3], one thumbnail per second (or None); audio: float32 mono samples at `sample_rate`
    covering the S seconds (or None: no audio). prediction: a sequence of per-second rows (dicts with `second`,
    `label`, `event_prob`, `class_prob`; optionally `window`) or an object with such `.rows`. ground_truth: a label
    name (or "background", or None for unknown) per second.
    """
    rows = list(getattr(prediction, "rows", prediction))
    seconds = len(rows)
    if seconds == 0:
        raise ValueError("timeline_png: the prediction has no rows")
    duration = float(duration_s if duration_s is not None else getattr(prediction, "duration_s", None) or seconds)
    labels = [str(r["label"]) for r in rows]
    colors = class_colors(list(class_names))
    for lab in set(labels) | set(g for g in (ground_truth or []) if g):
        colors.setdefault(lab, "#bcbd22")  # a name the model does not know (ground truth of another class list)

    # geometry: about 0.25 in per second within [12, 36] in; thumbnails at least ~1 in wide
    width = float(np.clip(8 + 0.25 * seconds, 12, 36))
    plot_w = width - 2.3
    has_frames = frames is not None and len(frames) > 0
    k = 0
    thumb_h = 0.0
    if has_frames:
        k = max(1, min(len(frames), seconds, int(plot_w / 0.9)))  # one per second while cells are >= 0.9 in
        fh, fw = frames.shape[1:3]
        thumb_h = float(np.clip(plot_w / k * fh / fw, 0.7, 1.6))
    gt = list(ground_truth) if ground_truth is not None else None
    heights = ([thumb_h] if has_frames else []) + [0.8, 1.3, 0.55] + ([0.55] if gt is not None else []) + [1.1]
    header = 0.75 + 0.2 * len(notes)
    legend_rows = math.ceil((len({*labels, *(g for g in gt or [] if g)}) + 4) / 5)
    footer = 0.55 + 0.25 * legend_rows
    fig = Figure(figsize=(width, sum(heights) + header + footer + 0.15 * len(heights)))
    top = 1 - header / fig.get_figheight()
    bottom = footer / fig.get_figheight()
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, left=1.6 / width, right=1 - 0.7 / width, top=top,
                          bottom=bottom, hspace=0.18)
    axes = [fig.add_subplot(gs[i]) for i in range(len(heights))]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    i = 0

    def label_axis(ax, text):
        ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=9, labelpad=8)

    # frames
    if has_frames:
        ax = axes[i]
        i += 1
        span = seconds / k
        for j in range(k):
            s = min(int(j * span), len(frames) - 1)
            ax.imshow(frames[s], extent=(j * span, (j + 1) * span, 0, 1), aspect="auto", interpolation="bilinear")
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        label_axis(ax, "frames")
    # waveform
    ax_w = axes[i]
    i += 1
    silent = audio is None or audio.size == 0 or not np.any(audio)
    if not silent:
        env_bins = int(min(audio.size, 2400))
        lo, hi = _envelope(np.asarray(audio, np.float32), env_bins)
        t = np.linspace(0, audio.size / sample_rate, lo.size)
        ax_w.fill_between(t, lo, hi, color="#1f4e79", linewidth=0)
        peak = float(max(np.abs(lo).max(), np.abs(hi).max(), 1e-6))
        ax_w.set_ylim(-peak * 1.05, peak * 1.05)
    else:
        ax_w.set_ylim(-1, 1)
        ax_w.axhline(0, color="#1f4e79", linewidth=0.8)
    if audio_note or silent:
        ax_w.text(0.5, 0.5, audio_note or "silence", transform=ax_w.transAxes, ha="center", va="center",
                  fontsize=10, color="#a40000", fontweight="bold",
                  bbox=dict(facecolor="white", alpha=0.85, edgecolor="#a40000"))
    ax_w.set_yticks([])
    label_axis(ax_w, "waveform")
    # spectrogram
    ax_s = axes[i]
    i += 1
    if not silent:
        db, nyquist = _spectrogram(np.asarray(audio, np.float32), sample_rate)
        top_db = float(np.percentile(db, 99.5))
        ax_s.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=top_db - 80, vmax=top_db,
                    extent=(0, audio.size / sample_rate, 0, nyquist / 1000), interpolation="nearest")
        ax_s.set_yticks([0, round(nyquist / 2000), round(nyquist / 1000)])
        ax_s.tick_params(axis="y", labelsize=7)
        ax_s.text(1.005, 0.5, "kHz", transform=ax_s.transAxes, fontsize=7, va="center")
    else:
        ax_s.set_yticks([])
        ax_s.set_facecolor("black")
    label_axis(ax_s, "spectrogram")

    # predicted labels (and ground truth) as coloured boxes; a run's name inside it when it fits
    px_per_s = plot_w / seconds

    def boxes(ax, labs, name):
        for start, end, lab in _runs(labs):
            color = colors.get(lab, "white") if lab is not None else "white"
            ax.add_patch(Rectangle((start, 0), end - start, 1, facecolor=color, linewidth=1, hatch="//" if lab is None
                                   else None, edgecolor="#b0b0b0" if lab is None else "white"))
            text = "n/a" if lab is None else ("bg" if lab == BACKGROUND else lab)
            if lab == BACKGROUND and _fits(BACKGROUND, (end - start) * px_per_s, 8):
                text = BACKGROUND
            if _fits(text, (end - start) * px_per_s, 8):
                ax.text((start + end) / 2, 0.5, text, ha="center", va="center", fontsize=8,
                        color="black" if lab in (BACKGROUND, None) else "white", fontweight="bold", clip_on=True)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        label_axis(ax, name)

    boxes(axes[i], labels, "prediction")
    i += 1
    if gt is not None:
        gt = (gt + [None] * seconds)[:seconds]
        boxes(axes[i], gt, "ground truth")
        i += 1
    # probabilities
    ax_p = axes[i]
    x = np.arange(seconds) + 0.5
    ev = np.array([float(r["event_prob"]) for r in rows])
    cp = np.array([float(r.get("class_prob", np.nan)) for r in rows])
    ax_p.axhline(0.5, color="#888888", linestyle="--", linewidth=0.8)
    ax_p.step(np.arange(seconds + 1), np.append(ev, ev[-1]), where="post", color="#c00000", linewidth=1.6,
              label="event probability")
    if np.isfinite(cp).any():
        ax_p.step(np.arange(seconds + 1), np.append(cp, cp[-1]), where="post", color="#2f5597", linewidth=1.2,
                  linestyle=":", label="class probability (per window)")
    if seconds <= 40:
        ax_p.plot(x, ev, "o", color="#c00000", markersize=3)
    ax_p.set_ylim(-0.03, 1.03)
    ax_p.set_yticks([0, 0.5, 1])
    ax_p.tick_params(axis="y", labelsize=7)
    label_axis(ax_p, "probability")
    ax_p.set_xlabel("time (s)", fontsize=9)

    # time axis: whole seconds, window boundaries, the real end of the video
    axes[0].set_xlim(0, seconds)
    step = 1 if seconds <= 30 else (5 if seconds <= 150 else (30 if seconds <= 900 else 60))
    ax_p.set_xticks(np.arange(0, seconds + 1, step))
    ax_p.tick_params(axis="x", labelsize=8)
    for ax in axes[:-1]:
        ax.tick_params(axis="x", labelbottom=False, length=0)
    if window_s and seconds > window_s:
        for b in range(window_s, seconds, window_s):
            for ax in axes:
                ax.axvline(b, color="black", linestyle=":", linewidth=1.0, alpha=0.8)
            if seconds / window_s <= 40:
                axes[0].text(b, 1.02, f"window {b // window_s}", transform=axes[0].get_xaxis_transform(),
                             fontsize=7, ha="left", va="bottom")
    if duration < seconds - 1e-6:
        for ax in axes:
            ax.axvspan(duration, seconds, color="white", alpha=0.55, linewidth=0)
            ax.axvline(duration, color="#a40000", linewidth=1)
        ax_p.text(duration, 1.02, f"video ends at {duration:.2f} s ", transform=ax_p.get_xaxis_transform(),
                  fontsize=7, color="#a40000", ha="right", va="bottom")

    # title, notes, legend
    chars = int(width * 72 / (0.6 * 12))
    fig.text(0.5, 1 - 0.12 / fig.get_figheight(), textwrap.shorten(title or "prediction", chars),
             ha="center", va="top", fontsize=12, fontweight="bold")
    for j, note in enumerate(notes):
        fig.text(0.5, 1 - (0.45 + 0.2 * j) / fig.get_figheight(), textwrap.shorten(note, int(chars * 1.35)),
                 ha="center", va="top", fontsize=9, color="#a40000" if note.isupper() or "RANDOM" in note else "#333")
    present = [n for n in [*class_names, BACKGROUND] if n in labels or n in (gt or [])]
    present += sorted({lab for lab in [*labels, *(g for g in gt or [] if g)] if lab not in present})
    handles = [Patch(facecolor=colors[n], edgecolor="#555555", label=n) for n in present]
    handles += [Patch(facecolor="white", edgecolor="#555555", hatch="//", label="no ground truth")] \
        if gt is not None and None in gt else []
    handles += ax_p.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, max(1, len(handles))), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.02))
    return _save(fig, path)


# ---- training -----------------------------------------------------------------------------------------------------
NOT_LOSSES = {"epoch", "lr", "bece", "stage", "train_acc", "train_s", "eval_s"}


def _read_history(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return {"True": 1.0, "False": 0.0}.get(str(v), math.nan)


def training_curves_png(metrics_csv: Path, out: Path) -> Path:
    """Loss terms and accuracies per epoch from a run's metrics.csv (BECE start and the best val epoch marked)."""
    hist = _read_history(Path(metrics_csv))
    if not hist:
        raise ValueError(f"{metrics_csv}: no epochs recorded")
    epochs = np.array([_num(r["epoch"]) for r in hist])
    cols = list(hist[0])
    losses = [c for c in cols if c not in NOT_LOSSES and not c.endswith("_acc")]
    accs = [c for c in cols if c.endswith("_acc")]
    fig = Figure(figsize=(13, 4.6))
    gs = fig.add_gridspec(1, 2, left=0.06, right=0.98, top=0.87, bottom=0.24, wspace=0.2)
    ax_l, ax_a = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    marker = "o" if len(hist) <= 30 else None
    msize = 6 if len(hist) <= 3 else 3
    positive = True
    for c in losses:
        y = np.array([_num(r[c]) for r in hist])
        positive &= bool(np.all(y[np.isfinite(y)] > 0))
        ax_l.plot(epochs, y, marker=marker, markersize=msize, linewidth=2.2 if c == "loss" else 1.2,
                  color="black" if c == "loss" else None, label=c)
    finite = np.array([_num(r[c]) for r in hist for c in losses])
    finite = finite[np.isfinite(finite)]
    if positive and finite.size and finite.max() / max(finite.min(), 1e-12) > 50:
        ax_l.set_yscale("log")
    ax_l.set_title("training loss (total and terms)", fontsize=11)
    styles = {"train_acc": ("#555555", "-"), "val_acc": ("#2f5597", "-"), "test_acc": ("#c00000", "--")}
    for c in accs:
        color, ls = styles.get(c, (None, "-"))
        ax_a.plot(epochs, [_num(r[c]) for r in hist], marker=marker, markersize=msize, color=color, linestyle=ls,
                  label=c.replace("_acc", ""))
    ax_a.set_ylim(-2, 102)
    ax_a.set_ylabel("segment accuracy (%)")
    ax_a.set_title("accuracy", fontsize=11)
    bece = [e for e, r in zip(epochs, hist) if str(r.get("bece")) in ("True", "1", "1.0")]
    sel = "val_acc" if "val_acc" in accs else ("test_acc" if "test_acc" in accs else None)
    for ax in (ax_l, ax_a):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if bece:
            ax.axvline(bece[0], color="#7f6000", linestyle=":", linewidth=1.2, label=f"BECE on (epoch {bece[0]:g})")
    summary = Path(metrics_csv).with_name("metrics.json")  # the run's summary says which epoch was selected
    try:
        chosen = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    except ValueError:
        chosen = {}
    if chosen.get("selected_on") in ("val", "test"):
        sel = f"{chosen['selected_on']}_acc"
    if sel:
        vals = np.array([_num(r[sel]) for r in hist])
        b = None
        if chosen.get("best_epoch") in set(epochs.tolist()):
            b = int(np.flatnonzero(epochs == chosen["best_epoch"])[0])
        elif np.isfinite(vals).any():
            b = int(np.nanargmax(vals))  # ties keep the earlier epoch, as training selects
        if b is not None:
            ax_a.plot([epochs[b]], [vals[b]], marker="*", markersize=14, color=styles.get(sel, ("#2f5597",))[0],
                      linestyle="none", markeredgecolor="black", markeredgewidth=0.5,
                      label=f"selected: epoch {epochs[b]:g}, {sel.replace('_acc', '')} {vals[b]:.1f} %")
    if len(epochs) == 1:
        for ax in (ax_l, ax_a):
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    for ax in (ax_l, ax_a):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"training run {Path(metrics_csv).resolve().parent.name}: {len(hist)} epoch"
                 f"{'s' if len(hist) != 1 else ''}", fontsize=12, fontweight="bold")
    return _save(fig, out)


# ---- evaluation ---------------------------------------------------------------------------------------------------
def confusion_png(metrics: Mapping[str, Any], out: Path) -> Path:
    """Row-normalised confusion matrix (row = true label) with counts, from `localization_metrics` output."""
    cm = np.asarray(metrics["confusion"], dtype=np.int64)
    names = list(metrics.get("labels") or [str(i) for i in range(len(cm))])
    n = len(names)
    cell = 0.9 if n <= 6 else (0.6 if n <= 12 else 0.42)  # inches per cell: counts stay legible
    label_in = 0.085 * max(len(_short(s)) for s in names) + 0.6
    side = n * cell
    fig = Figure(figsize=(side + label_in + 1.6, side + label_in + 0.8), layout="constrained")
    ax = fig.add_subplot()
    support = cm.sum(1, keepdims=True)
    pct = np.where(support > 0, 100 * cm / np.maximum(support, 1), 0.0)
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    fontsize = 10 if n <= 6 else (8 if n <= 12 else 7)
    for r in range(n):
        for c in range(n):
            if cm[r, c]:
                ax.text(c, r, str(cm[r, c]), ha="center", va="center", fontsize=fontsize,
                        color="white" if pct[r, c] > 55 else "black")
    short = [_short(s) for s in names]
    ticks = 10 if n <= 12 else 8
    ax.set_xticks(range(n), short, rotation=45, ha="right", rotation_mode="anchor", fontsize=ticks)
    ax.set_yticks(range(n), short, fontsize=ticks)
    ax.set_xlabel("predicted", fontsize=11)
    ax.set_ylabel("true", fontsize=11)
    cb = fig.colorbar(im, ax=ax, shrink=min(1.0, 0.5 + 0.05 * n), pad=0.02)
    cb.set_label("% of the true label's segments")
    split = metrics.get("split", "")
    ax.set_title(f"confusion matrix{' (' + split + ')' if split else ''}: accuracy {metrics['accuracy']:.2f} %, "
                 f"{metrics.get('segments', int(cm.sum()))} segments\n(colour: share of the row; numbers: segments)",
                 fontsize=11)
    return _save(fig, out)


def per_class_png(metrics: Mapping[str, Any], out: Path) -> Path:
    """Accuracy per true label (horizontal bars, segment counts), with the overall accuracy marked."""
    per = metrics["per_class"]
    names = [n for n in (metrics.get("labels") or per) if n in per]
    n = len(names)
    longest = max((len(_short(s, 32)) for s in names), default=10)
    left = 0.3 + 0.075 * longest  # inches for the names
    right = 1.5  # inches for the value column
    width = 10.0
    height = float(np.clip(1.5 + 0.32 * n, 2.6, 14))
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, 0.75 / height, 1 - (left + right) / width, 1 - 1.35 / height))
    acc = np.array([per[s]["accuracy"] for s in names])
    colors = class_colors([s for s in names if s != BACKGROUND])
    y = np.arange(n)
    ax.barh(y, acc, color=[colors.get(s, BACKGROUND_COLOR) for s in names], edgecolor="#444444", linewidth=0.5)
    for yi, a, s in zip(y, acc, names):  # values in their own column right of the axes: never under a bar/line
        ax.text(1.02, yi, f"{a:5.1f} %  (n={per[s]['segments']})", va="center", fontsize=8, clip_on=False,
                transform=ax.get_yaxis_transform(), family="monospace")
    ax.set_yticks(y, [_short(s, 32) for s in names], fontsize=9)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("segment accuracy (%)")
    ax.axvline(metrics["accuracy"], color="#c00000", linestyle="--", linewidth=1.2)
    ax.text(metrics["accuracy"], 1.01, f"overall {metrics['accuracy']:.1f} %", color="#c00000", fontsize=8,
            ha="center", va="bottom", transform=ax.get_xaxis_transform())
    ax.grid(axis="x", alpha=0.3)
    split = metrics.get("split", "")
    fig.suptitle(f"per-class accuracy{' (' + split + ')' if split else ''}", fontsize=12, fontweight="bold",
                 y=1 - 0.08 / height)
    return _save(fig, out)


def _rel(image: Path, base: Path) -> str:
    try:
        return Path(image).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(image).resolve().as_posix()


def evaluation_report_md(metrics: Mapping[str, Any], images: Mapping[str, Path], out: Path) -> Path:
    """A short markdown report (headline numbers, per-class table, notes) embedding `images` ({title: png})."""
    out = Path(out)
    split = metrics.get("split", "?")
    ev, bg = metrics.get("event", {}), metrics.get("background", {})
    lines = [f"# Evaluation on the {split} split", ""]
    if metrics.get("checkpoint"):
        epoch = metrics.get("checkpoint_epoch")
        lines.append(f"checkpoint: `{metrics['checkpoint']}`" + (f" (epoch {epoch})" if epoch is not None else ""))
        lines.append("")
    for note in metrics.get("notes") or []:
        lines.append(f"> **note:** {note}")
    if metrics.get("notes"):
        lines.append("")
    lines += ["| metric | value |", "|---|---|",
              f"| segment accuracy (papers' metric) | **{metrics['accuracy']:.2f} %** "
              f"({metrics.get('correct_segments', '?')} / {metrics.get('segments', '?')}) |",
              f"| all-background baseline | {metrics.get('all_background_accuracy', float('nan')):.2f} % |"]
    for name, d in (("event", ev), ("background", bg)):
        if d:
            lines.append(f"| {name} segments: precision / recall / F1 | {d['precision']:.1f} / {d['recall']:.1f} / "
                         f"{d['f1']:.1f} % |")
    lines.append("")
    for title, image in images.items():
        lines += [f"## {title}", "", f"![{title}]({_rel(Path(image), out.parent)})", ""]
    per = metrics.get("per_class") or {}
    if per:
        lines += ["## Per class", "", "| label | accuracy | segments |", "|---|---|---|"]
        lines += [f"| {name} | {d['accuracy']:.1f} % | {d['segments']} |" for name, d in per.items()]
        lines.append("")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return out


def evaluation_pictures(metrics: Mapping[str, Any], out_dir: Path, split: str) -> dict[str, Path]:
    """What `evaluate` writes beside its metrics: confusion_<split>.png, per_class_<split>.png and
    report_<split>.md (which embeds both). Returns {output name: path}."""
    out_dir = Path(out_dir)
    confusion = confusion_png(metrics, out_dir / f"confusion_{split}.png")
    per_class = per_class_png(metrics, out_dir / f"per_class_{split}.png")
    report = evaluation_report_md(metrics, {"Confusion matrix": confusion, "Per-class accuracy": per_class},
                                  out_dir / f"report_{split}.md")
    return {"confusion": confusion, "per_class": per_class, "report": report}

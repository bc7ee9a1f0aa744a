"""Pictures inside Prefect markdown artifacts: a stage's PNG files embedded as `data:image/png;base64,...` URIs
(the Prefect UI cannot open local files but renders such images), each with its file path on the line below.

- `png_markdown(path, alt)`: one PNG as markdown, as it is when small and narrow enough, else downsized to at most
  `max_px` wide and re-encoded (full colour or a 256-colour palette, whichever is smaller); past the budget, or
  when the file is missing or unreadable, the path line with a note instead (never an exception).
- `pictures_markdown(pictures)`: several, within one artifact's budget (a few hundred KB).
- `finetune_png(folder)`, `dense_timelines(...)`: the pictures the flows draw where a stage writes none (the
  fine-tuning loss and retrieval curves; timelines of a few evaluated dense videos), into the stage's folder,
  with `pipeline.ave.plots` / `pipeline.dense.plots` (matplotlib's object API, atomic writes).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

MAX_PX = 900  # widest picture embedded (pixels): the UI shows it at page width anyway
MAX_BYTES = 300_000  # one picture's data URI at most (characters)
MAX_TOTAL = 350_000  # all the pictures of one artifact at most (characters)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _path_line(path: Path, alt: str, note: str = "") -> str:
    return f"**{alt}** (PNG): `{path}`" + (f" ({note})" if note else "")


def _encode(path: Path, max_px: int, max_bytes: int) -> bytes | None:
    """The PNG's bytes to embed: as they are when narrow and small enough, else downsized to `max_px` wide and
    re-encoded (full colour or a 256-colour palette, whichever is smaller); None when that is over `max_bytes` as
    base64."""
    raw = path.read_bytes()
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")

    def fits(data: bytes) -> bool:
        return 4 * math.ceil(len(data) / 3) <= max_bytes

    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        if img.width <= max_px and fits(raw):
            return raw
        if img.mode in ("RGBA", "LA", "P"):  # matplotlib's figures are opaque: flatten onto white
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, "white")
            img.paste(rgba, mask=rgba.getchannel("A"))
        elif img.mode != "RGB":
            img = img.convert("RGB")
        if img.width > max_px:
            img = img.resize((max_px, max(1, round(img.height * max_px / img.width))), Image.Resampling.LANCZOS)
        encoded = []
        for candidate in (img, img.quantize(256, method=Image.Quantize.MEDIANCUT)):
            buf = io.BytesIO()
            candidate.save(buf, format="PNG", optimize=True)
            encoded.append(buf.getvalue())
    smallest = min(encoded, key=len)  # a chart's 256-colour version is usually the smaller, and looks the same
    return smallest if fits(smallest) else None


def png_markdown(path: Path | str, alt: str, max_px: int = MAX_PX, max_bytes: int = MAX_BYTES) -> str:
    """`![alt](data:image/png;base64,...)`, a blank line, then `**alt** (PNG): `path``; only the path line, with a
    note, when the file is missing, unreadable or over `max_bytes` (characters of base64) even when re-encoded."""
    path = Path(path)
    if not path.is_file():
        return _path_line(path, alt, "not written")
    try:
        data = _encode(path, max_px, max_bytes)
    except Exception as e:  # a picture never fails a stage
        return _path_line(path, alt, f"not embedded: {type(e).__name__}: {e}")
    if data is None:
        return _path_line(path, alt, f"not embedded: over {max_bytes // 1000} KB even at {max_px} px wide")
    alt_text = alt.replace("[", "(").replace("]", ")")
    return f"![{alt_text}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})\n\n{_path_line(path, alt)}"


def pictures_markdown(pictures: Iterable[tuple[str, Path | str]], max_px: int = MAX_PX,
                      max_total: int = MAX_TOTAL) -> str:
    """Several pictures ({alt, path} pairs), one after another, together at most `max_total` characters: once the
    budget is spent, the rest are path lines with a note."""
    parts, left = [], max_total
    for alt, path in pictures:
        if left < 1000:
            parts.append(_path_line(Path(path), alt, "not embedded: this artifact's picture budget is spent"))
            continue
        md = png_markdown(path, alt, max_px=max_px, max_bytes=min(MAX_BYTES, left))
        left -= len(md)
        parts.append(md)
    return "\n\n".join(parts)


def replace_images(text: str, base: Path, max_px: int = MAX_PX, max_total: int = MAX_TOTAL) -> str:
    """A markdown report's `![alt](file.png)` images (paths relative to `base`) embedded as data URIs."""
    import re

    pattern = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
    left = [max_total]

    def repl(m: re.Match) -> str:
        target = Path(m.group(2))
        target = (target if target.is_absolute() else base / target).resolve()
        if left[0] < 1000:
            return _path_line(target, m.group(1), "not embedded: this artifact's picture budget is spent")
        md = png_markdown(target, m.group(1), max_px=max_px, max_bytes=min(MAX_BYTES, left[0]))
        left[0] -= len(md)
        return md

    return pattern.sub(repl, text)


# ---- pictures the stages do not draw themselves --------------------------------------------------------------------
def finetune_png(folder: Path, out: Path | None = None) -> Path:
    """The fine-tuning run in `folder`: loss per epoch (loss.csv) and held-out retrieval recall before, during and
    after (retrieval.json; "not measured" and why when it was skipped). Written to `out` (default
    folder/curves.png)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from pipeline.ave.plots import _save

    folder = Path(folder)
    out = Path(out) if out is not None else folder / "curves.png"
    rows = []
    if (folder / "loss.csv").is_file():
        with open(folder / "loss.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    retrieval = json.loads((folder / "retrieval.json").read_text(encoding="utf-8")) \
        if (folder / "retrieval.json").is_file() else {}

    fig = Figure(figsize=(13, 4.6))
    gs = fig.add_gridspec(1, 2, left=0.06, right=0.98, top=0.87, bottom=0.24, wspace=0.2)
    ax_l, ax_r = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    epochs = np.array([int(r["epoch"]) + 1 for r in rows], dtype=float)  # epochs completed
    marker = "o" if len(rows) <= 30 else None
    if rows:
        ax_l.plot(epochs, [float(r["loss"]) for r in rows], marker=marker, color="black", linewidth=2.0,
                  label="contrastive loss")
    else:
        ax_l.text(0.5, 0.5, "no epochs recorded", transform=ax_l.transAxes, ha="center", va="center", color="#555")
    ax_l.set_title("training loss", fontsize=11)

    before, after = retrieval.get("before") or {}, retrieval.get("after") or {}
    curve = retrieval.get("curve") or []
    if not curve and "audio_to_visual" in before and "audio_to_visual" in after:
        curve = [{"epoch": 0, **before}, {"epoch": len(rows), **after}]
    curve = [c for c in curve if "audio_to_visual" in c]
    if curve:
        x = [c["epoch"] for c in curve]
        ks = list(curve[-1]["audio_to_visual"])
        styles = {"audio_to_visual": ("#c00000", "a->v"), "visual_to_audio": ("#2f5597", "v->a")}
        for direction, (color, short) in styles.items():
            for k, ls in zip(ks, ("-", "--", ":")):
                ax_r.plot(x, [c[direction][k] for c in curve], marker="o", color=color, linestyle=ls,
                          label=f"{short} {k}")
        chance = curve[-1].get("chance") or {}
        for k, ls in zip(ks, ("-", "--", ":")):
            if k in chance:
                ax_r.axhline(chance[k], color="#7f7f7f", linestyle=ls, linewidth=1.0, label=f"chance {k}")
        ax_r.set_ylim(-2, 102)
        ax_r.set_title(f"held-out retrieval recall ({curve[-1].get('n', '?')} videos; epoch 0: before)", fontsize=11)
    else:
        why = after.get("skipped") or before.get("skipped") or "no retrieval.json"
        ax_r.set_ylim(0, 100)
        ax_r.text(0.5, 0.5, f"retrieval not measured:\n{why}", transform=ax_r.transAxes, ha="center", va="center",
                  color="#555555", wrap=True)
        ax_r.set_title("held-out retrieval recall", fontsize=11)
    ax_r.set_ylabel("recall (%)")
    for ax in (ax_l, ax_r):
        ax.set_xlabel("epochs completed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    if len(rows) == 1:
        ax_l.set_xlim(0, 2)
    fig.suptitle(f"fine-tuning run {folder.name}: {len(rows)} epoch{'s' if len(rows) != 1 else ''}", fontsize=12,
                 fontweight="bold")
    return _save(fig, out)


def dense_timelines(folder: Path, fs: Any, split: str, n: int = 4, top: int = 10) -> list[tuple[str, Path]]:
    """Timelines of the first `n` videos (by id) of the evaluated split: the `top` highest-scored predictions of
    predictions_<split>.json in `folder` (the subtitle counts the rest) over the ground truth. Written to
    folder/timelines/<video>_timeline.png; returns [(title, path)]."""
    from pipeline.dense.plots import timeline_png

    folder = Path(folder)
    preds = json.loads((folder / f"predictions_{split}.json").read_text(encoding="utf-8")).get("results", {})
    videos = sorted(fs.dataset.split(split), key=lambda v: v.id)[:n]
    out = []
    for video in videos:
        mine = preds.get(video.id, [])
        scores = sorted((float(p["score"]) for p in mine), reverse=True)
        gt = [{"segment": [e.start, e.end], "label_id": e.label_id} for e in video.events]
        duration = video.duration or max([1.0, *(float(p["segment"][1]) for p in mine),
                                          *(e.end for e in video.events)])
        path = folder / "timelines" / f"{video.id}_timeline.png"
        timeline_png(path, duration, mine, fs.class_names, ground_truth=gt,
                     title=f"{video.id} ({split}, {duration:.1f} s)",
                     min_score=scores[top - 1] if len(scores) >= top else 0.0)
        out.append((f"timeline {video.id}", path))
    return out

"""What the Prefect UI shows of a run: pictures embedded in the markdown artifacts as PNG data URIs (`flows.pictures`),
and task runs named after their stage.

The helpers here read a flow run's artifacts and task runs back through Prefect's client; the pipeline runs that
use them are the existing ones (tests/test_flows.py, tests/test_dense_train.py): no extra pipeline run here.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("prefect")

from flows.pictures import MAX_PX, PNG_SIGNATURE, finetune_png, pictures_markdown, png_markdown  # noqa: E402

DATA_URI = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")
MAX_ARTIFACT = 400_000  # characters of one artifact's markdown


# ---- helpers for the pipeline tests -------------------------------------------------------------------------------
def embedded_pngs(text: str) -> list[bytes]:
    """The PNG files a markdown text embeds as data URIs, decoded."""
    return [base64.b64decode(m) for m in DATA_URI.findall(text)]


def assert_embeds_pictures(text: str, at_least: int = 1) -> list[bytes]:
    pngs = embedded_pngs(text)
    assert "data:image/png;base64," in text and len(pngs) >= at_least, text[:2000]
    assert all(p.startswith(PNG_SIGNATURE) for p in pngs)
    assert len(text.encode()) < MAX_ARTIFACT, len(text.encode())
    return pngs


def flow_run_artifacts(flow_run_id) -> dict[str, str]:
    """{artifact key: markdown} of the flow run's markdown artifacts (read back through the API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["markdown"])))
    return {a.key: a.data for a in artifacts if a.key}


def latest_markdown_artifacts(key: str) -> list[str]:
    """Every markdown artifact with this key (newest first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          sort=ArtifactSort.CREATED_DESC)
    return [a.data for a in artifacts]


def task_run_names(flow_run_id, expected: set[str], timeout_s: float = 60.0) -> list[str]:
    """The names of the flow run's task runs. The server learns them from events, a moment after the run: polled
    until `expected` are all there (or the time is up)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            names = [r.name for r in runs]
            if expected <= set(names) or time.monotonic() > deadline:
                return names
            time.sleep(0.5)


def assert_stage_names(names: list[str], expected: set[str]) -> None:
    assert expected <= set(names), names
    assert not [n for n in names if re.fullmatch(r"[\w-]+-[0-9a-f]{3}", n)], names  # no "extract-278"


# ---- flows.pictures -----------------------------------------------------------------------------------------------
def _png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 255, np.uint8)
    for _ in range(40):  # a chart-like picture: blocks of flat colour and some lines
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        img[y:y + 20, x:x + rng.integers(20, 200)] = rng.integers(0, 255, 3)
    img[::37] = 0
    Image.fromarray(img).save(path)
    return path


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.size


def test_a_small_png_is_embedded_as_it_is_with_its_path_below(tmp_path):
    path = _png(tmp_path / "small.png", 400, 200)
    md = png_markdown(path, "small chart")
    [png] = assert_embeds_pictures(md)
    assert png == path.read_bytes()
    assert md.startswith("![small chart](data:image/png;base64,")
    assert md.splitlines()[-1] == f"**small chart** (PNG): `{path}`"


def test_a_wide_png_is_downsized_and_a_missing_or_broken_one_is_a_note(tmp_path):
    path = _png(tmp_path / "wide.png", 2400, 900)
    [png] = assert_embeds_pictures(png_markdown(path, "wide"))
    w, h = _size(png)
    assert w == MAX_PX and abs(h - 900 * MAX_PX / 2400) <= 1

    assert png_markdown(tmp_path / "nowhere.png", "gone") == f"**gone** (PNG): `{tmp_path / 'nowhere.png'}` " \
                                                             f"(not written)"
    (tmp_path / "broken.png").write_text("not a picture")
    assert "not embedded" in png_markdown(tmp_path / "broken.png", "broken") and "data:" not in \
        png_markdown(tmp_path / "broken.png", "broken")
    over = png_markdown(path, "wide", max_bytes=2000)  # even a 256-colour version is over: the path and why
    assert "data:" not in over and "not embedded: over" in over and str(path) in over


def test_pictures_of_one_artifact_share_a_budget(tmp_path):
    paths = [_png(tmp_path / f"p{i}.png", 1200, 700, seed=i) for i in range(6)]
    one = len(png_markdown(paths[0], "p0"))
    md = pictures_markdown([(f"p{i}", p) for i, p in enumerate(paths)], max_total=int(2.5 * one))
    assert 2 <= len(embedded_pngs(md)) < 6 and "not embedded" in md
    assert sum(len(u) for u in DATA_URI.findall(md)) <= 2.5 * one
    assert all(f"`{p}`" in md for p in paths)  # every path stays


def test_finetune_curves_with_and_without_retrieval(tmp_path):
    with open(tmp_path / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "loss", "temperature", "seconds"])
        for e in range(4):
            w.writerow([e, 0.001, 3.0 - 0.5 * e, 0.07, 1.0])
    recalls = {"n": 10, "audio_to_visual": {"R@1": 10.0, "R@5": 50.0},
               "visual_to_audio": {"R@1": 20.0, "R@5": 60.0}, "chance": {"R@1": 10.0, "R@5": 50.0}}
    (tmp_path / "retrieval.json").write_text(json.dumps({"before": recalls, "after": recalls, "curve": [
        {"epoch": 0, **recalls}, {"epoch": 2, **recalls}, {"epoch": 4, **recalls}]}))
    assert finetune_png(tmp_path).read_bytes().startswith(PNG_SIGNATURE)
    (tmp_path / "retrieval.json").write_text(json.dumps({"before": {"n": 0, "skipped": "0 held-out videos"},
                                                         "after": {"n": 0, "skipped": "0 held-out videos"}}))
    out = finetune_png(tmp_path, tmp_path / "skipped.png")
    assert_embeds_pictures(png_markdown(out, "fine-tuning"))

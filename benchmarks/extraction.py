"""Feature extraction: our stage against the reference's naive way, and peak memory for 10 vs 100 videos.

Throughput (same videos, same encoders, same device, same frames per segment, in one run):
- ours: `pipeline.ave.extract.extract` (decord grid decode in `--workers` processes overlapping the encoder,
  batched uint8 preprocessing on the device, frames batched across videos, features streamed to HDF5);
- naive, as CACE-Net's `visual_feature_extractor.py` / PANNs `inference.py` do it: decode every frame of the video,
  pick the grid frames with `int(l*fi + i/F*fi)`, PIL `ResNet50_Weights.IMAGENET1K_V2.transforms()` per frame
  (in a thread pool of 16, as the reference), one video per forward, results into a preallocated array; audio from
  a pre-extracted wav with `librosa.load(sr=32000)` (the wav extraction is not timed), one video per forward.
Model construction is excluded from both (ours: timing starts at the stage's first progress report, after the
encoders are built). Encoders are randomly initialised (no weights offline); speed does not depend on the values.

Data path alone (`datapath`): the same two pipelines with the ResNet-50 forward replaced by nothing (our
preprocessing still runs, up to the normalized batch), at 16 frames per segment. On a CPU the network takes ~97 %
of the time and both pipelines run at its speed; on a GPU the network is fast and this part sets the ceiling.
Besides wall time it reports CPU milliseconds per frame (all threads, and our decoding workers), which a busy
shared machine disturbs less than wall time and which says how many cores a given frame rate needs.

Precision (`precision`): the ResNet-50 trunk alone (fp32 contiguous, fp32 channels_last, bf16 channels_last, batch
16 at 224 px), then our visual stage on the same videos at each precision (fp32, bf16 autocast): frames/s, the
speed-up, and each row's cosine similarity to the fp32 features. bf16 is compared by default only where the device
has native bf16 (CUDA, or a CPU with AMX/AVX512-BF16); `--precisions fp32,bf16` forces it (slow where emulated).

Memory: the whole stage (both encoders) runs in a child process on 10 and on 100 generated videos. By default
it decodes in that process (`--memory-workers 0`), so the child's high-water RSS (`ru_maxrss`) is exact; the PSS
of the process tree is also sampled every 0.1 s (with decoding workers, PSS counts their shared pages once). The
reference would hold an [N,10,7,7,2048] float array (16.6 GB for AVE's 4143 rows) in RAM.

    python benchmarks/extraction.py                                   # CPU-sized defaults (F=2, 8 videos)
    python benchmarks/extraction.py --frames-per-segment 16 --videos 50 --memory 10,100   # a GPU machine
    python benchmarks/extraction.py --skip visual,audio,datapath,memory --precisions fp32,bf16   # precision only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import ave  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402


def make_dataset(root: Path, videos: int, seed: int = 0) -> Path:
    """AVE-like videos (320x240, 25 fps, 10 s, H.264 + AAC 44.1 kHz), cached between runs."""
    from pipeline.ave.synth import SynthConfig, generate_dataset, is_synth_output

    out = root / f"synth-{videos}-s{seed}"
    if not is_synth_output(out):
        t = time.perf_counter()
        generate_dataset(out, SynthConfig(videos=videos, classes=min(4, videos), seed=seed))
        print(f"generated {videos} videos in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- ours -------------------------------------------------------------------------------------------------------
def run_ours(dataset: Path, modality: str, fps_seg: int, device: str, workers: int, batch: int,
             precision: str = "auto", root: Path | None = None) -> dict:
    from pipeline.ave.extract import ExtractConfig, extract

    cfg = ExtractConfig(modality=modality, frames_per_segment=fps_seg, random_init=True, device=device,
                        workers=workers, precision=precision)  # one video per forward; `batch` is the naive path's
    start = {}

    def progress(done, total, vid):
        if "t" not in start:  # first call: encoders built, nothing decoded yet
            start["t"], start["cpu"] = time.perf_counter(), cpu_seconds()

    with (tempfile.TemporaryDirectory() if root is None else contextlib.nullcontext(root)) as where:
        t_all = time.perf_counter()
        res = extract(dataset, cfg, Path(where), progress=progress, force=True)[modality]
        t1, c1 = time.perf_counter(), cpu_seconds()
        m = res.manifest
    return {"seconds": t1 - start["t"], "seconds_with_model_build": t1 - t_all, "path": str(res.path),
            "precision": m.metrics["encoder"]["precision"],
            "cpu_s": c1 - start["cpu"] + ours_worker_cpu(m, workers),
            "encode_s": m.timings.get("encode_s"), "decode_wait_s": m.timings.get("decode_wait_s"),
            "videos": m.metrics["videos"]}


def ours_worker_cpu(manifest, workers: int) -> float:
    """CPU time of the decoding workers (they are children of a fork server, invisible to RUSAGE_CHILDREN); with
    workers=0 the decoding already counts as this process's CPU time."""
    return float(manifest.timings.get("decode_cpu_s") or 0.0) if workers else 0.0


# ---- precision: fp32 against bf16 autocast ----------------------------------------------------------------------
def trunk_speed(device: torch.device, precisions: list[str], batch: int = 16, repeats: int = 3) -> dict:
    """ResNet-50 up to layer4 alone, [batch,3,224,224]: fp32 contiguous, fp32 channels_last, bf16 channels_last
    (frames/s, best of `repeats` after one warm-up forward)."""
    import torchvision

    from pipeline.runtime import autocast

    model = torchvision.models.resnet50(weights=None)
    trunk = torch.nn.Sequential(*list(model.children())[:-2]).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    out = {}
    for name, layout, precision in (("fp32 contiguous", torch.contiguous_format, "fp32"),
                                    ("fp32 channels_last", torch.channels_last, "fp32"),
                                    ("bf16 channels_last", torch.channels_last, "bf16")):
        if precision not in precisions:
            continue
        trunk.to(memory_format=layout)
        xx = x.contiguous(memory_format=layout)
        times = []
        with torch.inference_mode(), autocast(device, precision):
            for i in range(repeats + 1):
                sync(device)
                t0 = time.perf_counter()
                trunk(xx)
                sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
        out[name] = round(batch / min(times), 2)
        print(json.dumps({"trunk_frames_per_s": {name: out[name]}}), flush=True)
    return out


def precision_comparison(dataset: Path, fps_seg: int, device: str, workers: int, precisions: list[str]) -> dict:
    """Our visual stage at each precision on the same videos: frames/s, and the per-row cosine similarity of each
    precision's features to the fp32 ones (min and mean over every row's [10,7,7,2048] block, flattened)."""
    import h5py

    from pipeline.runtime import cpu_bf16_flags

    n_videos = len(ave.load_dataset(dataset).video_ids())
    out = {"cpu_bf16_flags": cpu_bf16_flags(), "runs": {}}
    with tempfile.TemporaryDirectory() as root:
        for precision in precisions:
            r = run_ours(dataset, "visual", fps_seg, device, workers, 0, precision, Path(root) / precision)
            out["runs"][precision] = {"frames_per_s": round(n_videos * 10 * fps_seg / r["seconds"], 2),
                                      "seconds": round(r["seconds"], 2), "path": r["path"]}
            print(json.dumps({"precision": {precision: out["runs"][precision]}}), flush=True)
        if "fp32" in out["runs"]:
            with h5py.File(out["runs"]["fp32"]["path"]) as f:
                ref = torch.from_numpy(f["avadataset"][:]).flatten(1).double()
            for precision, run in out["runs"].items():
                with h5py.File(run["path"]) as f:
                    x = torch.from_numpy(f["avadataset"][:]).flatten(1).double()
                cos = torch.nn.functional.cosine_similarity(x, ref, dim=1)
                run.update(min_row_cosine_to_fp32=float(cos.min()), mean_row_cosine_to_fp32=float(cos.mean()),
                           speedup_vs_fp32=round(out["runs"]["fp32"]["seconds"] / run["seconds"], 2))
        for run in out["runs"].values():
            run.pop("path")
    return out


# ---- naive ------------------------------------------------------------------------------------------------------
def naive_visual(dataset: Path, fps_seg: int, device: torch.device) -> dict:
    import decord
    import torchvision
    from PIL import Image

    ds = ave.load_dataset(dataset)
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    transform = weights.transforms()
    model = torchvision.models.resnet50(weights=None)
    trunk = torch.nn.Sequential(*list(model.children())[:-2]).eval().to(device)
    out = np.zeros((len(ds), 10, 7, 7, 2048), np.float32)  # the reference preallocates the whole dataset
    rows = ds.rows_by_video()
    pool = ThreadPoolExecutor(16)
    decode_s = 0.0
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for vid in ds.video_ids():
        td = time.perf_counter()
        vr = decord.VideoReader(str(ds.video_path(vid)))
        n = len(vr)
        frames = vr.get_batch(list(range(n))).asnumpy()  # every frame, as the reference's cv2 loop reads them
        fi = int(n / 10)
        idx = [int(s * fi + (i / fps_seg) * fi) for s in range(10) for i in range(fps_seg)]
        tensors = list(pool.map(lambda k: transform(Image.fromarray(frames[k])), idx))
        decode_s += time.perf_counter() - td
        x = torch.stack(tensors).to(device)
        with torch.inference_mode():
            y = trunk(x)  # one video per forward: [10F,2048,7,7]
        y = y.reshape(10, fps_seg, 2048, 7, 7).mean(1).permute(0, 2, 3, 1).cpu().numpy()
        for r in rows[vid]:
            out[r] = y
    sync(device)
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "decode_and_transform_s": decode_s,
            "videos": len(rows)}


def extract_wavs(dataset: Path, folder: Path) -> dict[str, Path]:
    """The reference's separate first step (moviepy -> wav at the native rate); not timed."""
    import av
    import soundfile

    ds = ave.load_dataset(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for vid in ds.video_ids():
        path = folder / f"{vid}.wav"
        if not path.is_file():
            with av.open(str(ds.video_path(vid))) as c:
                s = c.streams.audio[0]
                chunks = [f.to_ndarray().reshape(-1) for f in c.decode(s)]
                soundfile.write(path, np.concatenate(chunks).astype(np.float32), s.rate)
        out[vid] = path
    return out


def naive_audio(dataset: Path, wavs: dict[str, Path], device: torch.device) -> dict:
    import librosa

    from extractors.cnn14 import CNN14_ARGS, import_cnn14_class

    ds = ave.load_dataset(dataset)
    model = import_cnn14_class()(**CNN14_ARGS).eval().to(device)
    out = np.zeros((len(ds), 10, 2048), np.float32)
    rows = ds.rows_by_video()
    librosa.load(str(next(iter(wavs.values()))), sr=32000, mono=True)  # numba warm-up, not timed
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for vid in ds.video_ids():
        y, _ = librosa.load(str(wavs[vid]), sr=32000, mono=True)
        y = np.pad(y, (0, max(0, 320000 - y.size)))[:320000].reshape(10, 32000)
        with torch.inference_mode():
            emb = model(torch.from_numpy(y).to(device))["embedding"].cpu().numpy()
        for r in rows[vid]:
            out[r] = emb
    sync(device)
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "videos": len(rows)}


# ---- the data path alone (what bounds throughput once the encoder is fast, e.g. on a GPU) -----------------------
def register_null_visual():
    """ResNet-50's real preprocessing (resize, crop, scale, normalize) with the forward pass replaced by zeros."""
    from extractors import register_extractor
    from extractors.resnet50 import ResNet50Extractor

    @register_extractor
    class NullVisual(ResNet50Extractor):
        name = "null-visual"

        def __init__(self, weights=None, **kwargs):
            super().__init__(None, **{**kwargs, "random_init": True})

        @torch.inference_mode()
        def encode(self, units):
            x = self.normalize(units)
            k = units.shape[0] // self.units_per_segment
            return torch.zeros(k, *self.segment_shape) + x.mean()  # touch the data, skip the network

    return NullVisual


def ours_data_path(dataset: Path, fps_seg: int, workers: int, batch: int) -> dict:
    from pipeline.ave.extract import ExtractConfig, extract

    register_null_visual()
    cfg = ExtractConfig(modality="visual", visual_encoder="null-visual", frames_per_segment=fps_seg,
                        random_init=True, device="cpu", workers=workers)
    start = {}

    def progress(*_):
        if "t" not in start:
            start["t"], start["cpu"] = time.perf_counter(), cpu_seconds()

    with tempfile.TemporaryDirectory() as root:
        m = extract(dataset, cfg, Path(root), progress=progress)["visual"].manifest
        return {"seconds": time.perf_counter() - start["t"],
                "cpu_s": cpu_seconds() - start["cpu"] + ours_worker_cpu(m, workers)}


def naive_data_path(dataset: Path, fps_seg: int) -> dict:
    import decord
    import torchvision
    from PIL import Image

    ds = ave.load_dataset(dataset)
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    pool = ThreadPoolExecutor(16)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for vid in ds.video_ids():
        vr = decord.VideoReader(str(ds.video_path(vid)))
        n = len(vr)
        frames = vr.get_batch(list(range(n))).asnumpy()
        fi = int(n / 10)
        idx = [int(s * fi + (i / fps_seg) * fi) for s in range(10) for i in range(fps_seg)]
        torch.stack(list(pool.map(lambda k: transform(Image.fromarray(frames[k])), idx))).mean()
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (our decoding workers)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


# ---- memory -----------------------------------------------------------------------------------------------------
def _tree_pss_kib(pid: int) -> int:
    """Proportional set size of a process and its descendants: forked decoding workers share most of their pages
    with the parent, which a sum of RSS would count once per process."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def peak_memory(dataset: Path, fps_seg: int, device: str, workers: int, batch: int) -> dict:
    """Run the whole stage in a child process. With workers=0 (the default here) the child's high-water RSS
    (`ru_maxrss` from wait4) is exact; with decoding workers, the PSS of the process tree is sampled every 0.1 s."""
    code = ("import sys, tempfile; from pathlib import Path; sys.path.insert(0, %r); "
            "from pipeline.ave.extract import ExtractConfig, extract; "
            "cfg = ExtractConfig(frames_per_segment=%d, random_init=True, device=%r, workers=%d); "
            "d = tempfile.mkdtemp(); extract(%r, cfg, Path(d)); import shutil; shutil.rmtree(d)"
            % (str(REPO), fps_seg, device, workers, str(dataset)))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _tree_pss_kib(proc.pid))
        time.sleep(0.1)
    if status:
        raise RuntimeError(f"memory run failed with status {status}")
    n = len(ave.load_dataset(dataset))
    out = {"rows": n, "workers": workers, "seconds": round(time.perf_counter() - t0, 1),
           "max_rss_mib": round(usage.ru_maxrss / 1024, 1), "sampled_peak_pss_mib": round(peak / 1024, 1),
           "naive_preallocation_mib": round(n * 10 * 7 * 7 * 2048 * 4 / 2**20, 1)}
    return out


def best(runs: list[dict]) -> dict:
    """The fastest run, with every run's wall and CPU seconds; `cpu_s` becomes the smallest CPU time seen (on a
    shared machine both vary with other load, CPU time much less)."""
    fastest = min(runs, key=lambda r: r["seconds"])
    return {**fastest, "all_seconds": [round(r["seconds"], 2) for r in runs],
            "all_cpu_s": [round(r["cpu_s"], 2) for r in runs], "cpu_s": min(r["cpu_s"] for r in runs)}


def alternate(n: int, naive, ours) -> tuple[dict, dict]:
    """naive, ours, naive, ours...: both get warm runs; the fastest of each counts."""
    a, b = [], []
    for _ in range(max(1, n)):
        a.append(naive())
        b.append(ours())
    return best(a), best(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames-per-segment", type=int, default=2, help="AVE: 16 (slow on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="ResNet-50 frames per forward (ours)")
    p.add_argument("--memory", default="10,100", help="video counts for the peak-memory runs ('' to skip)")
    p.add_argument("--memory-frames-per-segment", type=int, default=1)
    p.add_argument("--memory-workers", type=int, default=0, help="decoding workers in the memory runs (0: exact "
                                                                   "high-water mark of one process)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "avel-bench",
                   help="where generated videos are kept between runs")
    p.add_argument("--datapath-frames-per-segment", type=int, default=16,
                   help="frames per segment for the data-path-only comparison (decode + preprocessing, no network)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: visual,audio,datapath,memory,"
                                              "precision")
    p.add_argument("--precisions", default=None, help="precisions compared in the `precision` part (default: "
                                                      "fp32,bf16 where the device has native bf16, else fp32)")
    p.add_argument("--precision-videos", type=int, default=None, help="videos for the precision part (default "
                                                                      "--videos)")
    p.add_argument("--repeats", type=int, default=3, help="runs per method, alternating; the fastest counts "
                                                          "(the first run of a process pays warm-up)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = resolve_device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    F = args.frames_per_segment
    report = {"device": str(device), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "frames_per_segment": F, "videos": args.videos, "workers": args.workers, "batch": args.batch}
    print(json.dumps(report), flush=True)
    ds = make_dataset(args.work, args.videos)
    frames = args.videos * 10 * F
    if "precision" not in skip:
        from pipeline.runtime import fast_bf16

        precisions = (args.precisions.split(",") if args.precisions else
                      ["fp32", "bf16"] if fast_bf16(device) else ["fp32"])
        report["trunk_frames_per_s"] = trunk_speed(device, precisions)
        pds = make_dataset(args.work, args.precision_videos) if args.precision_videos else ds
        report["precision"] = precision_comparison(pds, F, str(device), args.workers, precisions)
        print(json.dumps({"precision": report["precision"]}), flush=True)
    if "visual" not in skip:
        naive, ours = alternate(args.repeats, lambda: naive_visual(ds, F, device),
                                lambda: run_ours(ds, "visual", F, str(device), args.workers, args.batch))
        report["resnet50"] = {
            "ours_frames_per_s": round(frames / ours["seconds"], 2),
            "ours_videos_per_s": round(args.videos / ours["seconds"], 3),
            "naive_frames_per_s": round(frames / naive["seconds"], 2),
            "naive_videos_per_s": round(args.videos / naive["seconds"], 3),
            "speedup": round(naive["seconds"] / ours["seconds"], 2),
            "ours_cpu_ms_per_frame": round(1000 * ours["cpu_s"] / frames, 1),
            "naive_cpu_ms_per_frame": round(1000 * naive["cpu_s"] / frames, 1),
            "ours": ours, "naive": naive}
        print(json.dumps({"resnet50": report["resnet50"]}), flush=True)
    if "audio" not in skip:
        wavs = extract_wavs(ds, args.work / "wav")
        naive, ours = alternate(args.repeats, lambda: naive_audio(ds, wavs, device),
                                lambda: run_ours(ds, "audio", F, str(device), args.workers, args.batch))
        report["cnn14"] = {
            "ours_seconds_audio_per_s": round(args.videos * 10 / ours["seconds"], 2),
            "ours_videos_per_s": round(args.videos / ours["seconds"], 3),
            "naive_seconds_audio_per_s": round(args.videos * 10 / naive["seconds"], 2),
            "naive_videos_per_s": round(args.videos / naive["seconds"], 3),
            "speedup": round(naive["seconds"] / ours["seconds"], 2),
            "ours_cpu_ms_per_audio_s": round(1000 * ours["cpu_s"] / (args.videos * 10), 1),
            "naive_cpu_ms_per_audio_s": round(1000 * naive["cpu_s"] / (args.videos * 10), 1),
            "ours": ours, "naive": naive}
        print(json.dumps({"cnn14": report["cnn14"]}), flush=True)
    if "datapath" not in skip:
        dp_f = args.datapath_frames_per_segment
        n_frames = args.videos * 10 * dp_f
        naive, ours = alternate(args.repeats, lambda: naive_data_path(ds, dp_f),
                                lambda: ours_data_path(ds, dp_f, args.workers, args.batch))
        report["data_path"] = {
            "frames_per_segment": dp_f,
            "ours_frames_per_s": round(n_frames / ours["seconds"], 1),
            "naive_frames_per_s": round(n_frames / naive["seconds"], 1),
            "speedup": round(naive["seconds"] / ours["seconds"], 2),
            "ours_cpu_ms_per_frame": round(1000 * ours["cpu_s"] / n_frames, 2),
            "naive_cpu_ms_per_frame": round(1000 * naive["cpu_s"] / n_frames, 2),
            "ours": ours, "naive": naive}
        print(json.dumps({"data_path": report["data_path"]}), flush=True)
    if "memory" not in skip and args.memory:
        report["memory"] = {}
        for n in [int(x) for x in args.memory.split(",")]:
            mem_ds = make_dataset(args.work, n, seed=1)
            report["memory"][n] = {"frames_per_segment": args.memory_frames_per_segment,
                                   **peak_memory(mem_ds, args.memory_frames_per_segment, str(device),
                                                 args.memory_workers, args.batch)}
            print(json.dumps({"memory": {n: report["memory"][n]}}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

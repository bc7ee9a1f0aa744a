"""Throughput of the released feature sets' encoders (random weights: the cost does not depend on the values).

    python benchmarks/feature_sets.py [--device cpu|cuda] [--repeats 3] [--out benchmarks/feature-sets-results.json]

Per encoder and precision (fp32, and bf16 where the device has native bf16: CUDA, or a CPU with AMX/AVX512-BF16):
- vgg19: frames/s of 224-px pool5 maps, a batch of 16 frames (one AVE second);
- vggish: seconds of audio per second, a 60-s 44.1-kHz clip at the 0.96-s and the 0.32-s hop (resampling included);
- i3d_rgb: 24-frame 224-px windows per second;
- raft: 256x344 frame pairs per second at 20 updates (the flow of one pair; I3D flow adds an I3D window per 8 pairs).
Each number is the median of `--repeats` timed runs after one warm-up. On a GPU machine:
`python benchmarks/feature_sets.py --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernel selection, resampy's compilation)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from extractors import create_extractor
    from extractors.raft import RaftFlow
    from pipeline.runtime import configure_process, fast_bf16, resolve_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("feature-sets-results.json"))
    args = parser.parse_args()
    configure_process()
    device = resolve_device(args.device)
    precisions = ["fp32"] + (["bf16"] if fast_bf16(device) else [])
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (16, 240, 320, 3), dtype=np.uint8)
    audio = (rng.standard_normal(60 * 44100) * 0.1, 44100)
    window = rng.integers(0, 256, (25, 240, 320, 3), dtype=np.uint8)
    rows = []

    def row(encoder: str, precision: str, what: str, value: float, unit: str) -> None:
        rows.append({"encoder": encoder, "precision": precision, "what": what, "value": round(value, 3),
                     "unit": unit})
        print(f"{encoder:8s} {precision:5s} {what:28s} {value:9.3f} {unit}", flush=True)

    for p in precisions:
        vgg = create_extractor("vgg19", random_init=True, device=device, precision=p)
        units = vgg.prepare(frames)
        row("vgg19", p, "224-px frames, batch 16", 16 / timed(lambda: vgg.encode(units), args.repeats), "frames/s")
        for hop in (0.96, 0.32):
            vgg_a = create_extractor("vggish", random_init=True, device=device, precision=p, hop_s=hop)
            row("vggish", p, f"60-s clip, hop {hop}", 60 / timed(lambda: vgg_a.encode_clip(audio), args.repeats),
                "s audio/s")
        i3d = create_extractor("i3d_rgb", random_init=True, device=device, precision=p)
        row("i3d_rgb", p, "24x224x224 windows", 1 / timed(lambda: i3d.encode_clip(iter(window)), args.repeats),
            "windows/s")
        raft = RaftFlow(random_init=True, device=device, precision=p)
        a = torch.from_numpy(np.ascontiguousarray(window[:1].transpose(0, 3, 1, 2)))
        a = torch.nn.functional.interpolate(a.float(), size=(256, 344), mode="bilinear", align_corners=False)
        row("raft", p, "256x344 pairs, 20 updates", 1 / timed(lambda: raft.flow(a, a.flip(-1)), args.repeats),
            "pairs/s")
    info = {"device": str(device), "torch_threads": torch.get_num_threads(), "rows": rows}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    args.out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

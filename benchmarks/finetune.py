"""Images per second of the fine-tuning step (ResNet-50 + projection heads, symmetric InfoNCE), fp32 against bf16.

The step `pipeline/ave/finetune.py` runs, on random frames already decoded and normalized (the data path is measured
by `benchmarks/extraction.py`): forward through the trunk (frozen stages without autograd, trainable ones with),
the heads, the loss in float32, backward, SGD step. Layouts: contiguous (the old CPU path) and channels_last (what
the stage runs on every device now); precisions: fp32, and bf16 autocast where the device has native bf16 (or with
`--bf16`). Randomly initialised trunk (speed does not depend on the weights). Each variant: one untimed warm-up
step, then the best of `--steps` timed steps.

    python benchmarks/finetune.py                                  # the demo's settings: layer4, 112 px, 16 x 4
    python benchmarks/finetune.py --stages all --crop 224 --videos 8 --frames 10   # the paper's, smaller batch
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.finetune import AudioVisualContrastive  # noqa: E402
from models.losses import info_nce_loss  # noqa: E402
from pipeline.runtime import autocast, configure_process, fast_bf16, heap_allocations, resolve_device  # noqa: E402


def bench(device, stages, crop: int, videos: int, frames: int, precision: str, channels_last: bool,
          steps: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = AudioVisualContrastive(torchvision.models.resnet50(weights=None), visual_dim=2048, audio_dim=2048,
                                   trainable_stages=stages).to(device)
    if channels_last:
        model.channels_last = True
        model.trunk.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(videos, frames, 3, crop, crop, device=device)
    a = torch.randn(videos, 2048, device=device)
    times = []
    with heap_allocations():
        for i in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast(device, precision):
                v, e, _ = model(x, a)
            loss = info_nce_loss(v.float(), e.float(), temperature=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    s = min(times)
    return {"precision": precision, "layout": "channels_last" if channels_last else "contiguous",
            "images_per_s": round(videos * frames / s, 2), "s_per_step": round(s, 3),
            "images_per_step": videos * frames}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--stages", default="layer4", help="'all' or a comma list among conv1,bn1,layer1..layer4")
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--videos", type=int, default=16, help="videos per batch")
    p.add_argument("--frames", type=int, default=4, help="frames per video")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="also bf16 where the device has no native bf16")
    args = p.parse_args()
    configure_process()
    device = resolve_device(args.device)
    stages = "all" if args.stages == "all" else args.stages.split(",")
    variants = [("fp32", False), ("fp32", True)]
    if fast_bf16(device) or args.bf16:
        variants.append(("bf16", True))
    rows = []
    for precision, cl in variants:
        rows.append(bench(device, stages, args.crop, args.videos, args.frames, precision, cl, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| precision | layout | images/s | s / step ({rows[0]['images_per_step']} images) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['layout']} | {r['images_per_s']} | {r['s_per_step']} |")
    print(f"\ndevice {device}, {torch.get_num_threads()} threads, stages {args.stages}, {args.crop} px, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()

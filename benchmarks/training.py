"""Seconds per training epoch and per evaluation pass of the CACE localizer on AVE-sized random features.

AVE sizes: 3339 train / 402 test videos, VGG-19 + VGGish dims (7x7x512, 128) as the paper run, batch 64
(53 training steps per epoch), float32 vs float64 (the reference trains in float64). The features are random
tensors held in memory (the training stage holds real features the same way), so this measures the model's
compute, which dominates. On a CPU a whole epoch takes minutes: `--steps N` times N steps and scales to the
epoch's 53, and says so in its output.

    python benchmarks/training.py                  # all steps, both precisions, auto device
    python benchmarks/training.py --steps 5        # quick CPU estimate
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from models import CACEConfig, CACENet, cace_loss
from pipeline.runtime import autocast, resolve_device


def random_split(n: int, cfg: CACEConfig, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(n, 10, 7, 7, cfg.video_dim, generator=g).to(device, dtype)
    audio = torch.randn(n, 10, cfg.audio_dim, generator=g).to(device, dtype)
    labels = torch.zeros(n, 10, cfg.num_classes + 1, dtype=dtype, device=device)
    cls = torch.randint(0, cfg.num_classes, (n,), generator=g)
    event = torch.rand(n, 10, generator=g) < 0.83  # AVE: 83 % event segments
    labels[event, cls[:, None].expand(-1, 10)[event]] = 1
    labels[~event, cfg.num_classes] = 1
    return visual, audio, labels


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(dtype, device, train_n: int, test_n: int, batch: int, steps: int | None, amp: bool) -> dict:
    torch.manual_seed(0)
    cfg = CACEConfig()
    model = CACENet(cfg).to(device, dtype)
    model.bece_enabled = True  # the costlier phase (SupCon on), as 175 of the paper's 200 epochs
    opt = torch.optim.Adam(model.parameters(), lr=7e-4)
    tv, ta, ty = random_split(train_n, cfg, dtype, device)
    total_steps = math.ceil(train_n / batch)
    n_steps = min(steps or total_steps, total_steps)
    model.train()
    for i in range(n_steps + 1):  # step 0 is warm-up, not timed
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        s = (i % total_steps) * batch
        with autocast(device, amp):
            out = model(tv[s:s + batch], ta[s:s + batch])
        out = type(out)(*(t.to(dtype) for t in out))
        loss, _ = cace_loss(out, ty[s:s + batch], contrastive=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    sync(device)
    step_s = (time.perf_counter() - t0) / n_steps
    del tv, ta, ty
    ev, ea, _ = random_split(test_n, cfg, dtype, device, seed=1)
    model.eval()
    with torch.no_grad():
        model(ev[:batch], ea[:batch])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, test_n, batch):
            with autocast(device, amp):
                model(ev[s:s + batch], ea[s:s + batch])
        sync(device)
    return {"dtype": str(dtype).replace("torch.", ""), "device": str(device), "amp": amp and device.type == "cuda",
            "train_steps_timed": n_steps, "train_steps_per_epoch": total_steps,
            "train_s_per_epoch": round(step_s * total_steps, 2), "train_s_per_step": round(step_s, 4),
            "eval_s_per_pass": round(time.perf_counter() - t0, 3), "extrapolated": n_steps < total_steps}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="time this many training steps and scale to an epoch")
    p.add_argument("--train-videos", type=int, default=3339)
    p.add_argument("--test-videos", type=int, default=402)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for amp in ([False, True] if device.type == "cuda" and dtype == torch.float32 else [False]):
            r = bench(dtype, device, args.train_videos, args.test_videos, args.batch, args.steps, amp)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n| device | dtype | AMP | s / train epoch ({args.train_videos} videos) | s / eval pass ({args.test_videos}) |")
    print("|---|---|---|---|---|")
    for r in rows:
        note = f" (from {r['train_steps_timed']} of {r['train_steps_per_epoch']} steps)" if r["extrapolated"] else ""
        print(f"| {r['device']} | {r['dtype']} | {'bf16' if r['amp'] else '-'} | {r['train_s_per_epoch']}{note} | "
              f"{r['eval_s_per_pass']} |")


if __name__ == "__main__":
    main()

"""Seconds per training epoch of the CACE localizer on AVE-sized random features: ours against the reference loop.

AVE sizes: 3339 train / 402 test videos, VGG-19 + VGGish dims (7x7x512, 128) as the paper run, batch 64
(53 training steps per epoch), BECE on (the costlier phase, 175 of the paper's 200 epochs). The features are random
tensors held in memory (the training stage holds real features the same way), so this measures the model's
compute. Each variant runs in its own fresh process (allocator state and thread pools do not carry over):

- `reference`: the reference loop's numerics: float64, torch's nn.Dropout (bernoulli masks), one matrix product
  per Linear layer, glibc's default allocator behaviour;
- `ours-fp32`: what `avel train` runs: float32, dropout masks from integer bits (models.cace.Dropout), the
  visual projections that share an input as one product, large tensors reused from the heap
  (runtime.heap_allocations);
- `ours-bf16`: the same under bf16 autocast (losses in float32), where the device has native bf16 or `--bf16`;
- ablations (`--ablations`): ours-fp32 with one part reverted at a time, to show what each part is worth;
- `ours-fp32-compiled` (`--compile`): torch.compile of the model, compile time reported separately.

On a CPU a whole epoch takes minutes: `--steps N` times N steps (after one untimed warm-up step) and scales the
median step to the epoch's 53, and says so. `--repeats` runs each variant that many times, alternating with the
others, and the fastest run counts: on a shared machine other jobs' bursts moved a single run by up to 20 %.

    python benchmarks/training.py --steps 5                 # quick CPU comparison
    python benchmarks/training.py --steps 5 --ablations --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import CACEConfig, CACENet, cace_loss  # noqa: E402
from models import cace as cace_module  # noqa: E402
from pipeline.runtime import autocast, configure_process, fast_bf16, heap_allocations, resolve_device  # noqa: E402

# variant -> (dtype, precision, fast dropout, fused projections, heap allocations, compile)
VARIANTS = {
    "reference": ("float64", "fp32", False, False, False, False),
    "ours-fp32": ("float32", "fp32", True, True, True, False),
    "ours-bf16": ("float32", "bf16", True, True, True, False),
    "ours-fp32 without heap allocations": ("float32", "fp32", True, True, False, False),
    "ours-fp32 with nn.Dropout": ("float32", "fp32", False, True, True, False),
    "ours-fp32 without fused projections": ("float32", "fp32", True, False, True, False),
    "reference numerics in float32": ("float32", "fp32", False, False, False, False),
    "ours-fp32-compiled": ("float32", "fp32", True, True, True, True),
}


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


@contextlib.contextmanager
def reference_layers(fast_dropout: bool, fused: bool):
    """Swap our two model-level speed-ups back to the plain torch way (for the reference and the ablations)."""
    saved = cace_module.Dropout.forward, cace_module._shared_input_linear
    if not fast_dropout:
        cace_module.Dropout.forward = torch.nn.Dropout.forward
    if not fused:
        cace_module._shared_input_linear = lambda x, *layers: [layer(x) for layer in layers]
    try:
        yield
    finally:
        cace_module.Dropout.forward, cace_module._shared_input_linear = saved


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(variant: str, device, train_n: int, test_n: int, batch: int, steps: int | None) -> dict:
    dtype_name, precision, fast_dropout, fused, heap, compiled = VARIANTS[variant]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    cfg = CACEConfig()
    model = CACENet(cfg).to(device, dtype)
    model.bece_enabled = True
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=7e-4)
    tv, ta, ty = random_split(train_n, cfg, dtype, device)
    total_steps = math.ceil(train_n / batch)
    n_steps = min(steps or total_steps, total_steps)
    model.train()
    step_times = []
    with reference_layers(fast_dropout, fused), (heap_allocations() if heap else contextlib.nullcontext()):
        for i in range(n_steps + 1):  # step 0 is warm-up (and compilation), not timed
            sync(device)
            t0 = time.perf_counter()
            s = (i % total_steps) * batch
            with autocast(device, precision):
                out = forward(tv[s:s + batch], ta[s:s + batch])
            out = type(out)(*(t.to(dtype) for t in out))
            loss, _ = cace_loss(out, ty[s:s + batch], contrastive=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sync(device)
            step_times.append(time.perf_counter() - t0)
        first_step_s, step_times = step_times[0], step_times[1:]
        step_s = statistics.median(step_times)  # robust to other jobs' bursts on a shared machine
        del tv, ta, ty
        ev, ea, _ = random_split(test_n, cfg, dtype, device, seed=1)
        model.eval()
        with torch.no_grad():
            with autocast(device, precision):
                forward(ev[:batch], ea[:batch])  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for s in range(0, test_n, batch):
                with autocast(device, precision):
                    forward(ev[s:s + batch], ea[s:s + batch])
            sync(device)
        eval_s = time.perf_counter() - t0
    return {"variant": variant, "dtype": dtype_name, "precision": precision, "device": str(device),
            "threads": torch.get_num_threads(), "train_steps_timed": n_steps, "train_steps_per_epoch": total_steps,
            "train_s_per_step": round(step_s, 4), "train_s_per_epoch": round(step_s * total_steps, 2),
            "step_s_all": [round(t, 3) for t in step_times],
            "first_step_s": round(first_step_s, 2), "eval_s_per_pass": round(eval_s, 3),
            "extrapolated": n_steps < total_steps}


def run_variant(variant: str, args) -> dict:
    """One variant in a fresh interpreter (this script with --one), its JSON line parsed back."""
    cmd = [sys.executable, __file__, "--one", variant, "--device", args.device, "--train-videos",
           str(args.train_videos), "--test-videos", str(args.test_videos), "--batch", str(args.batch)]
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="time this many training steps and scale to an epoch")
    p.add_argument("--train-videos", type=int, default=3339)
    p.add_argument("--test-videos", type=int, default=402)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="also time bf16 where the device has no native bf16")
    p.add_argument("--ablations", action="store_true", help="also ours-fp32 with one part reverted at a time")
    p.add_argument("--compile", action="store_true", help="also torch.compile (compile time reported)")
    p.add_argument("--repeats", type=int, default=2, help="fresh-process runs per variant, alternating; the "
                                                          "fastest counts (all are printed)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    configure_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.one:
        print(json.dumps(bench(args.one, device, args.train_videos, args.test_videos, args.batch, args.steps)))
        return
    variants = ["reference", "ours-fp32"]
    if fast_bf16(device) or args.bf16:
        variants.append("ours-bf16")
    if args.ablations:
        variants += [v for v in VARIANTS if v.startswith("ours-fp32 ") or v.startswith("reference numerics")]
    if args.compile:
        variants.append("ours-fp32-compiled")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):  # alternating, so that a burst of other load hits every variant alike
        for v in variants:
            print(f"timing {v} (run {r + 1} of {args.repeats}) ...", file=sys.stderr, flush=True)
            runs[v].append(run_variant(v, args))
            print(json.dumps(runs[v][-1]), flush=True)
    rows = [{**min(rs, key=lambda x: x["train_s_per_epoch"]),
             "all_s_per_epoch": [x["train_s_per_epoch"] for x in rs]} for rs in runs.values()]
    ref = rows[0]["train_s_per_epoch"]
    print(f"\n| variant | dtype | precision | s / train epoch ({args.train_videos} videos) | vs reference | "
          f"s / eval pass ({args.test_videos}) | first step s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" (from {r['train_steps_timed']} of {r['train_steps_per_epoch']} steps)" if r["extrapolated"] else ""
        print(f"| {r['variant']} | {r['dtype']} | {r['precision']} | {r['train_s_per_epoch']}{note} "
              f"(runs: {', '.join(map(str, r['all_s_per_epoch']))}) | "
              f"{ref / r['train_s_per_epoch']:.2f}x | {r['eval_s_per_pass']} | {r['first_step_s']} |")
    print(f"\ndevice {rows[0]['device']}, {rows[0]['threads']} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()

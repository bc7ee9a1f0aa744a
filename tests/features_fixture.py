"""Tiny AVE-layout feature folders with a learnable signal, for localizer tests (no videos, no encoders)."""

from pathlib import Path

import h5py
import numpy as np

CLASSES = ["Church bell", "Male speech, man speaking", "Bark"]

# Small widths so a CPU forward/backward takes milliseconds; the structure is the reference's.
TINY_MODEL = {"video_fc_dim": 32, "audio_fc_dim": 16, "d_model": 16, "encoder_ff_dim": 32, "decoder_ff_dim": 32,
              "coguide_hidden_dim": 16, "coguide_qk_dim": 8}


def write_feature_folder(root: Path, n_train=9, n_val=3, n_test=3, video_dim=12, audio_dim=6, hw=2, seed=0,
                         visual_dtype="float64") -> Path:
    """Annotations.txt, *_order.h5, visual_feature.h5 [N,10,hw,hw,video_dim], audio_feature.h5 [N,10,audio_dim].

    Event segments carry the class prototype in both modalities; background segments carry noise only.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    root.mkdir(parents=True, exist_ok=True)
    lines, labels = [], np.zeros((n, 10), int)
    for i in range(n):
        c = i % len(CLASSES)
        start = int(rng.integers(0, 4)) if i % 4 else 0
        end = int(rng.integers(start + 3, 11)) if i % 4 else 10
        lines.append(f"{CLASSES[c]}&vid{i:08d}xy&good&{start}&{end}")
        labels[i] = -1
        labels[i, start:end] = c
    (root / "Annotations.txt").write_text("\n".join(lines) + "\n")
    proto_v, proto_a = rng.normal(size=(len(CLASSES), video_dim)) * 2, rng.normal(size=(len(CLASSES), audio_dim)) * 2
    visual = rng.normal(size=(n, 10, hw, hw, video_dim)) * 0.3
    audio = rng.normal(size=(n, 10, audio_dim)) * 0.3
    ev = labels >= 0
    visual[ev] += proto_v[labels[ev]][:, None, None, :]
    audio[ev] += proto_a[labels[ev]]
    with h5py.File(root / "visual_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=visual.astype(visual_dtype))
    with h5py.File(root / "audio_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=audio)
    perm = rng.permutation(n)
    for name, rows in (("train", perm[:n_train]), ("val", perm[n_train:n_train + n_val]),
                       ("test", perm[n_train + n_val:])):
        with h5py.File(root / f"{name}_order.h5", "w") as f:
            f.create_dataset("order", data=np.asarray(rows, np.int64))
    return root

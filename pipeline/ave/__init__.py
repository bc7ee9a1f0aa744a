"""The AVE task (ten 1-s segments per video): its data layer (`dataset`, re-exported here, so `from pipeline import
ave; ave.load_dataset(...)` reads as before), synthetic data, the stages (extract, finetune, train, predict), the
localizer comparison, segment metrics, pictures, and the full pipeline's config with its demo.

What is shared with the dense task (store, locks, configs, media, runtime, progress, CLI) lives in `pipeline/`."""

from pipeline.ave.dataset import *  # noqa: F401,F403  (the data layer is this package's face)
from pipeline.ave.dataset import AVEDataset, load_dataset  # noqa: F401  (named, for readers and linters)

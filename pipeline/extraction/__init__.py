"""The extraction engine both tasks share: videos -> features on a time grid, by encoders from the registry.

An extraction is three choices and one loop:
- a **time grid** (`grids`): how a video is cut into the steps that get one feature row each, and how an encoder
  sees them. AVE: ten 1-s segments, frames sampled inside each (`SegmentGrid`). UnAV-100: 0.96-s windows every
  0.32 s, or 1-s windows every second (`WindowGrid`). A released feature set's recipe (`RecipeGrid`): each stream
  decoded as the reference tools did (`recipes`: AVE's frame indices, the video at 25 fps, the 16-bit waveform;
  faithful via ffmpeg or fast in process) and encoded by clip encoders that window it themselves.
- a **feature set** (`feature_sets`): `cace` (ResNet-50 + Cnn14), `ave` (VGG-19 + VGGish), `unav` (I3D RGB + flow +
  VGGish): a named choice of encoders and recipes, not a code path.
- **encoders** (`encoders`): one per modality, built by name from `extractors` with their weight files located and
  checked before any work; a sharded worker keeps them between shards.
- a **writer** per stage (the task's own layout): AVE writes HDF5 rows in Annotations.txt order
  (`pipeline.ave.extract`), the dense task one `.npy` per video and modality (`pipeline.dense.extract`); a shard
  writes a part folder (`shards`).
- the **loop** (`engine.run_videos`): decoding workers, one forward per video with the CPU thread count pinned (the
  bytes of a video's features depend only on the video, the weights, the precision and that count), failures
  recorded per video, live progress, memory given back after each video.
`settings.ExtractSettings` holds the settings every extraction has (weights, device, precision, threads, failure
tolerance, cluster). Nothing here knows AVE's or UnAV's file layouts or datasets.
"""

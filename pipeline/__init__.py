"""Core of the AVEL pipeline, plain Python (no Prefect): AVE data layer, synthetic data, artifact store, stages, CLI."""

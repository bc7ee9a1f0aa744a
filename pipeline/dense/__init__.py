"""The dense AVEL task (untrimmed videos, UnAV-100 layout): annotations, feature files, synthetic data, evaluation."""

"""`python -m pipeline.cli ...`: the `avel` command (what the tests and benchmarks run in a subprocess)."""

from pipeline.cli import main

main()

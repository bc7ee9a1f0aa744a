"""Shared test fixtures. `../shared` (the real AVE metadata) sits beside the repository; AVEL_SHARED overrides."""

import os
from pathlib import Path

import pytest

from pipeline.runtime import configure_process

configure_process()  # as the CLI and the flows do, before any torch work

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AVEL_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "ave" / "Annotations.txt").is_file():
        pytest.fail(f"{SHARED}/ave not found: the tests need ../shared beside the repository (or AVEL_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def ave_meta(shared):
    from pipeline.ave import load_dataset

    return load_dataset(shared / "ave")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test of the session (starting one costs 10-20 s)."""
    pytest.importorskip("prefect")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

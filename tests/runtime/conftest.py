"""Session fixtures of the runtime tier: the tiny Qwen3 model with the demo chat data, and runs
that several tests read (each run starts torchrun and imports torch and megatron-core: seconds
that add up on CI's two cores)."""

from __future__ import annotations

import pytest

from tests.runtime.train_helpers import SharedRuns, make_assets


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """(model dir, dataset file): tiny random Qwen3 and 64 rows of demo chat data."""
    return make_assets(tmp_path_factory.mktemp("train-assets"))


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> SharedRuns:
    return SharedRuns(tmp_path_factory.mktemp("shared-runs"))

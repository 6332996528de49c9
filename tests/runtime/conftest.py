"""Session fixtures of the runtime tier: the tiny Qwen3 model with the demo chat data, preference
pairs for DPO, and runs that several tests read (each run starts torchrun and imports torch and
megatron-core: seconds that add up on CI's two cores)."""

from __future__ import annotations

import pytest

from tests.runtime.train_helpers import SharedRuns, make_assets

DPO_PAIRS = 6


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """(model dir, dataset file): tiny random Qwen3 and 64 rows of demo chat data."""
    return make_assets(tmp_path_factory.mktemp("train-assets"))


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> SharedRuns:
    return SharedRuns(tmp_path_factory.mktemp("shared-runs"))


@pytest.fixture(scope="session")
def dpo_assets(tmp_path_factory):
    """(policy model, a different reference model, preference pairs file) for the DPO tests."""
    from remote_runtime.data.demo_data import write_demo_preferences
    from remote_runtime.tiny import build_model

    root = tmp_path_factory.mktemp("dpo-assets")
    model, _ = make_assets(root)
    ref = build_model("qwen3", root / "ref-model", seed=7, tokenizer_dir=root / "tok")
    pairs = write_demo_preferences(root / "pairs.jsonl", num_rows=DPO_PAIRS)
    return model, ref, pairs

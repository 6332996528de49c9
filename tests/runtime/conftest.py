"""Fixtures shared by the runtime test modules (built once per session)."""

from __future__ import annotations

import pytest

from tests.runtime.train_helpers import make_assets

DPO_PAIRS = 6


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

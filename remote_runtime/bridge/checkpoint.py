"""A Hugging Face safetensors checkpoint on disk: which file holds which tensor, and slices of it.

Reads only headers up front; tensor data is read slice by slice (`safe_open(...).get_slice`),
memory-mapped, so a rank touches only the bytes of the shards it owns.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = ("F32", "BF16", "F16")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as a Hugging Face safetensors checkpoint."""


class HFCheckpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir).expanduser()
        self.files = self._weight_map()
        self._handles: dict[str, object] = {}
        self._meta: dict[str, tuple[list[int], str]] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            for name in sorted(set(weight_map.values())):
                if not (self.dir / name).is_file():
                    raise CheckpointError(f"{index} lists {name}, which is missing from {self.dir}")
            return dict(weight_map)
        single = self.dir / SINGLE
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {k: SINGLE for k in f.keys()}
        found = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
        hint = (
            f" (found {found[0]}: PyTorch .bin checkpoints are not supported; re-save it with "
            "save_pretrained(..., safe_serialization=True))"
            if found
            else ""
        )
        raise CheckpointError(f"{self.dir} has neither {INDEX} nor {SINGLE}{hint}")

    def keys(self) -> list[str]:
        return list(self.files)

    def handle(self, key: str):
        name = self.files[key]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.dir / name), framework="pt")
        return self._handles[name]

    def slice(self, key: str):
        return self.handle(key).get_slice(key)

    def meta(self, key: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype string) without reading data."""
        if key not in self._meta:
            sl = self.slice(key)
            self._meta[key] = (list(sl.get_shape()), sl.get_dtype())
        return self._meta[key]

    def close(self) -> None:
        for h in self._handles.values():
            exit_ = getattr(h, "__exit__", None)
            if exit_:
                exit_(None, None, None)
        self._handles.clear()

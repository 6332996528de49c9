"""On-disk cache of tokenized files, one entry per (file content, tokenizer, settings, code).

An entry is a directory `<cache_dir>/<key>/` with .npy arrays (memory-mapped on load) and a
`meta.json` that is written last; it is built under a temporary name and renamed into place,
so a reader never sees a half-written entry and two builders (say, nodes sharing an NFS output
directory) cannot corrupt each other. The key is a sha256 over:
  - the file's bytes (not its name or mtime),
  - the tokenizer: its full `tokenizer.json` serialisation (vocab, merges, added and special
    tokens, normalizer...), chat template and special tokens,
  - the EncodeSettings (task, max_length, truncation_strategy, system),
  - the source of the modules that turn rows into tokens, and the transformers/tokenizers
    versions, so a code change never reuses stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from remote_runtime.data.encode import EncodeSettings, FileTokens

_ARRAYS = ("ids", "loss_mask", "offsets", "doc_loss", "row_doc", "row_status")
# Modules whose code decides the tokens of a row (relative to remote_runtime/).
_CODE_FILES = (
    "spec/formats.py",
    "data/chat.py",
    "data/encode.py",
    "data/sources.py",
    "data/cache.py",
)


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def code_fingerprint() -> str:
    runtime = Path(__file__).parent.parent
    return _sha(*[(runtime / name).read_bytes() for name in _CODE_FILES])


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything in a tokenizer that changes the ids of a rendered conversation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.to_str()
    else:  # a Python tokenizer: its vocabulary is what we can see
        model = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True)
    specials = json.dumps(
        {k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True
    )
    return _sha(type(tokenizer).__name__, model, template, specials)


def cache_key(file_digest: str, tokenizer_fp: str, settings: EncodeSettings) -> str:
    import tokenizers
    import transformers

    return _sha(
        file_digest,
        tokenizer_fp,
        json.dumps(asdict(settings), sort_keys=True),
        code_fingerprint(),
        transformers.__version__,
        tokenizers.__version__,
    )


def load_entry(cache_dir: Path, key: str) -> FileTokens | None:
    entry = Path(cache_dir) / key
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    return FileTokens(format=meta["format"], **arrays)


def save_entry(cache_dir: Path, key: str, tokens: FileTokens, meta: dict) -> None:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=cache_dir))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(tokens, name)))
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": tokens.format}, indent=1))
        try:
            os.rename(tmp, cache_dir / key)
        except OSError:
            if not (cache_dir / key / "meta.json").is_file():
                raise  # not "someone else finished first": a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

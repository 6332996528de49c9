"""megatron-core parameters -> a Hugging Face checkpoint directory, streamed tensor by tensor.

    report = save_hf_checkpoint(chunks, out_dir, source_dir, dist)

Collective: every rank calls it. For each HF tensor, the owning pipeline stage gathers its
tensor-parallel pieces (data-parallel replicas stay out), rebuilds the HF tensor(s) and sends
them to global rank 0, which streams them into sharded safetensors files. Rank 0 holds one tensor
at a time, other ranks one parameter's pieces: no rank ever holds the whole model, and the
output needs no shared filesystem (only rank 0 writes). MoE experts are written per expert
(`mlp.experts.N.*`): each EP rank's experts by that EP rank's first expert-data-parallel replica,
after gathering its expert-TP pieces. Names, shapes and dtypes follow the
source checkpoint (`source_dir`, the directory the model was loaded from), whose config.json,
generation_config.json, tokenizer and other non-weight files are copied along. Everything is
written into `.<name>.tmp-<pid>` beside `out_dir` and renamed when complete, so `out_dir` either
does not exist or is a finished checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from remote_runtime.bridge.checkpoint import INDEX, HFCheckpoint
from remote_runtime.bridge.load import layout_for, row_keys
from remote_runtime.bridge.mapping import ConversionError, local_params
from remote_runtime.bridge.safetensors_stream import TORCH_DTYPES, StreamingWriter, nbytes
from remote_runtime.bridge.transforms import unshard
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.spec.families.base import moe_layer_flags
from remote_runtime.spec.resolve import read_hf_config

WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$|.*\.index\.json$")


@dataclass
class SaveReport:
    out_dir: str
    files: int
    tensors: int
    bytes_written: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB', '500MiB'")
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }[unit]
    return int(float(m.group(1)) * scale)


@dataclass
class _Unit:
    """One Megatron parameter to write: its row, layer, owning stage and that stage's rank 0.
    For per-expert rows, one unit per EP rank (`part`), each writing that rank's experts."""

    row_index: int
    layer: int | None
    part: int  # the EP rank whose experts this is (0 for the other rows)
    pp: int
    sender: int  # global rank of (pp, tp 0, dp 0, cp 0); experts: (pp, ep part, etp 0, edp 0)


def _ranks_info(dist, chunks_units: list[tuple[int, int | None]]) -> list[dict]:
    from megatron.core import parallel_state

    me = {
        "rank": dist.rank,
        "pp": dist.pp_rank,
        "tp": dist.tp_rank,
        "writer": parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0,
        "units": chunks_units,
        "ep": getattr(dist, "ep_rank", 0),
        "etp": getattr(dist, "etp_rank", 0),
        "expert_writer": parallel_state.get_expert_data_parallel_rank() == 0,
    }
    if dist.world_size == 1:
        return [me]
    everyone = [None] * dist.world_size
    torch.distributed.all_gather_object(everyone, me)
    return everyone


def _writes(info: dict, row) -> bool:
    """Whether the rank described by `info` writes its copy of `row` (or sends it to rank 0)."""
    if row.per_expert:
        return info["expert_writer"] and info["etp"] == 0
    return info["writer"] and info["tp"] == 0


def _plan_units(family, infos: list[dict]) -> list[_Unit]:
    units: dict[tuple, _Unit] = {}
    for info in infos:
        for row_index, layer in info["units"]:
            row = family.params[row_index]
            if row.save and _writes(info, row):
                part = info["ep"] if row.per_expert else 0
                units.setdefault(
                    (row_index, layer, part),
                    _Unit(row_index, layer, part, info["pp"], info["rank"]),
                )

    def order(u: _Unit):
        name = family.params[u.row_index].megatron
        group = 0 if name.startswith("embedding.") else 1 if "{layer}" in name else 2
        return group, u.layer or 0, u.row_index, u.part

    return sorted(units.values(), key=order)


def _plan_files(entries: list[tuple[str, list[int], torch.dtype]], max_bytes: int) -> list[list]:
    files, current, size = [], [], 0
    for entry in entries:
        n = nbytes(entry[1], entry[2])
        if current and size + n > max_bytes:
            files.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current:
        files.append(current)
    return files


def save_hf_checkpoint(
    chunks,
    out_dir: str | Path,
    source_dir: str | Path,
    dist,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> SaveReport:
    """Write the model as a Hugging Face checkpoint (see module docstring). Collective; every
    rank returns the same report."""
    start = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    hf_config = read_hf_config(source_dir)
    family = family_for_hf_config(hf_config)
    tc = family.transformer_config_kwargs(hf_config)
    tied = tc["share_embeddings_and_output_weights"]
    mine = {
        (family.params.index(lp.row), lp.layer): lp for lp in local_params(chunks, family, tied)
    }
    infos = _ranks_info(dist, sorted(mine, key=lambda u: (u[0], u[1] or 0)))
    units = _plan_units(family, infos)
    lay = layout_for(hf_config, family, dist)
    entries = _plan_entries(family, units, lay, source_dir, dtype)
    expected = set(
        family.expected_hf_keys(tc["num_layers"], tied, lay.num_experts, moe_layer_flags(tc))
    )
    if {e[0] for e in entries} != expected:
        raise ConversionError(
            [("HF tensors no rank can write", sorted(expected - {e[0] for e in entries}))]
        )
    files = _plan_files(entries, parse_size(max_shard_size))
    writer = _open_writer(out_dir, files, overwrite, dist)
    shapes = {e[0]: e for e in entries}
    me = infos[dist.rank]
    for u in units:
        row = family.params[u.row_index]
        keys = row_keys(row, u.layer, lay, u.part)
        lp = mine.get((u.row_index, u.layer))
        owner = (me["expert_writer"] and me["ep"] == u.part) if row.per_expert else me["writer"]
        if lp is not None and owner and dist.pp_rank == u.pp:
            tensors = _gather_unit(row, lp.param, lay, keys, dist)
            if tensors is None:  # only TP rank 0 of the owning stage has the full tensors
                continue
            for key in keys:
                t = tensors[key].to(shapes[key][2])
                if writer is not None:
                    writer.write(key, t)
                else:
                    torch.distributed.send(t.contiguous(), dst=0)
        elif writer is not None:  # rank 0 receives what other stages own
            for key in keys:
                buf = torch.empty(shapes[key][1], dtype=shapes[key][2], device=dist.device)
                torch.distributed.recv(buf, src=u.sender)
                writer.write(key, buf)
    report = None
    if writer is not None:
        written = writer.finish(Path(source_dir).expanduser(), dtype)
        report = SaveReport(
            str(out_dir), len(files), len(entries), written, time.perf_counter() - start
        )
    return _broadcast(report, dist)


def _plan_entries(family, units: list[_Unit], lay, source_dir, dtype) -> list[tuple]:
    """(HF key, shape, dtype) in writing order; shapes and dtypes from the source checkpoint."""
    source = HFCheckpoint(source_dir)
    entries = []
    try:
        for u in units:
            for key in row_keys(family.params[u.row_index], u.layer, lay, u.part):
                if key not in source.files:
                    raise ConversionError(
                        [
                            (
                                "not in the source checkpoint, so its shape and dtype are unknown",
                                [key],
                            )
                        ],
                        str(source.dir),
                    )
                shape, st_dtype = source.meta(key)
                entries.append((key, shape, dtype or TORCH_DTYPES[st_dtype]))
    finally:
        source.close()
    return entries


def _broadcast(value, dist):
    if dist.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _open_writer(out_dir: Path, files, overwrite: bool, dist):
    """Rank 0's writer; a failure to create it (existing directory, permissions) is raised on
    every rank, so none is left waiting in a collective."""
    writer, problem = None, None
    if dist.rank == 0:
        try:
            writer = _Rank0Writer(out_dir, files, overwrite)
        except OSError as exc:
            problem = f"{type(exc).__name__}: {exc}"
    problem = _broadcast(problem, dist)
    if problem:
        raise OSError(f"cannot write the checkpoint: {problem}")
    return writer


def _gather_unit(row, param, lay, keys: list[str], dist) -> dict | None:
    """All TP pieces of one parameter -> {HF key: tensor} on TP rank 0, None on the others
    (expert rows: all expert-TP pieces, on expert-TP rank 0)."""
    from megatron.core import parallel_state

    local = param.detach()
    if row.per_expert:
        size, rank = lay.etp, lay.etp_rank
        group = parallel_state.get_expert_tensor_parallel_group
    else:
        size, rank, group = dist.tp, dist.tp_rank, parallel_state.get_tensor_model_parallel_group
    if row.transform == "replicated" or size == 1:
        pieces = [local]
    else:
        pieces = [torch.empty_like(local) for _ in range(size)]
        torch.distributed.all_gather(pieces, local.contiguous(), group=group())
    if rank != 0:
        return None
    return unshard(row.transform, pieces, lay, keys)


class _Rank0Writer:
    """Streams the planned files into a temporary directory, then publishes it atomically."""

    def __init__(self, out_dir: Path, files: list[list], overwrite: bool):
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
        self.out_dir, self.files = out_dir, files
        self.tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.names = [
            f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))
        ]
        self.file_of = {e[0]: i for i, f in enumerate(files) for e in f}
        self.index = -1
        self.current = None
        self.bytes = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        i = self.file_of[key]
        if i != self.index:
            if self.current is not None:
                self.current.close()
            self.index = i
            self.current = StreamingWriter(str(self.tmp / self.names[i]), self.files[i])
        self.current.write(key, tensor)
        self.bytes += tensor.numel() * tensor.element_size()

    def finish(self, source_dir: Path, dtype: torch.dtype | None) -> int:
        if self.current is not None:
            self.current.close()
        weight_map = {e[0]: self.names[i] for i, f in enumerate(self.files) for e in f}
        (self.tmp / INDEX).write_text(
            json.dumps({"metadata": {"total_size": self.bytes}, "weight_map": weight_map}, indent=2)
            + "\n"
        )
        for item in sorted(source_dir.iterdir()):
            if item.is_file() and not WEIGHT_FILE.match(item.name):
                shutil.copy2(item, self.tmp / item.name)
        if dtype is not None:
            _set_config_dtype(self.tmp / "config.json", dtype)
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            self.out_dir.rename(old)
        self.tmp.rename(self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.bytes


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    config = json.loads(path.read_text())
    name = str(dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    path.write_text(json.dumps(config, indent=2) + "\n")

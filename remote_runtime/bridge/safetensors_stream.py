"""Write a safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor of the file in memory at once. The format is a
little-endian u64 header length, a JSON header (name -> dtype, shape, byte offsets) and the raw
bytes; when shapes and dtypes are known in advance (they are: the plan comes from the source
checkpoint), the header can be written first and the tensors streamed after it, so the writer
holds one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct

import torch

ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingWriter:
    def __init__(self, path: str, entries: list[tuple[str, list[int], torch.dtype]]):
        """entries: (name, shape, dtype) in the order the tensors will be written."""
        self.path = path
        self.order = [e[0] for e in entries]
        self.expect = {name: (list(shape), dtype) for name, shape, dtype in entries}
        header, offset = {}, 0
        for name, shape, dtype in entries:
            size = nbytes(shape, dtype)
            header[name] = {
                "dtype": ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)))
        self.file.write(blob)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            want = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path}: got {name}, expected {want}")
        shape, dtype = self.expect[name]
        if list(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"{name}: writing {tuple(tensor.shape)} {tensor.dtype}, planned "
                f"{tuple(shape)} {dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            self.file.close()
            raise RuntimeError(f"{self.path}: {len(self.order) - self.next} tensors never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

"""safetensors files read and written block by block, and the process's peak memory.

WeightFiles reads a tensor's rows with pread() at the offsets the safetensors header gives:
safe_open memory-maps the file, and every page a read touches stays resident while it is open, so a
merge of N models would grow to the sum of their sizes. StreamWriter writes the output the same way,
never holding it whole. Used by ops/merge.py; measured in benchmarks/bench_merge_memory.py.
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
from pathlib import Path

from tunelab.errors import ModelError

# safetensors dtype names -> bytes per entry
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _torch_dtype(name: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
            "F8_E5M2": getattr(torch, "float8_e5m2", None)}[name]



# ---------------------------------------------------------------- reading and writing safetensors, streamed


class WeightFiles:
    """The tensors of a saved model directory, read a row block at a time.

    The safetensors header (8-byte length, JSON: dtype, shape and byte offsets of every tensor) is parsed
    once; a block is then one pread() of its bytes into a fresh buffer. Not safe_open: it memory-maps the
    file, and every page a read touches stays resident while the file is open (RSS grows to the sum of
    the inputs), while opening it again for every block costs milliseconds each.
    """

    def __init__(self, model_dir: Path, label: str):
        self.dir, self.label = Path(model_dir), label
        self.files = weight_files(self.dir)
        if not self.files:
            raise ModelError(f"{label}: {model_dir} has no safetensors weights (model.safetensors or an index)")
        self.index: dict[str, tuple[Path, str, list[int], int]] = {}  # name -> file, dtype, shape, byte offset
        self.metadata: dict = {}
        self._fds: dict[Path, int] = {}
        for file in self.files:
            header, data_start = read_header(file, label)
            self.metadata = self.metadata or dict(header.pop("__metadata__", None) or {})
            header.pop("__metadata__", None)
            for key, info in header.items():
                dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
                if dtype not in DTYPE_SIZES or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
                    raise ModelError(f"{label}: {file} has tensor {key} of dtype {dtype} that cannot be read")
                self.index[key] = (file, dtype, shape, data_start + begin)

    def keys(self) -> set[str]:
        return set(self.index)

    def dtype(self, key: str) -> str:
        return self.index[key][1]

    def shape(self, key: str) -> list[int]:
        return self.index[key][2]

    def nbytes(self) -> int:
        return sum(math.prod(s) * DTYPE_SIZES[d] for _, d, s, _ in self.index.values())

    def read(self, key: str, start: int | None = None, stop: int | None = None):
        """Rows [start:stop] of a tensor (all of it without bounds), in a buffer of its own."""
        import torch

        file, dtype, shape, offset = self.index[key]
        if start is None or not shape:
            start, stop = 0, (shape[0] if shape else 1)
        row = (math.prod(shape[1:]) if shape else 1) * DTYPE_SIZES[dtype]
        buffer = torch.empty((stop - start) * row, dtype=torch.uint8)
        if buffer.numel():
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            got = os.preadv(fd, [buffer.numpy()], offset + start * row)
            if got != buffer.numel():
                raise ModelError(f"{self.label}: {file} ends inside tensor {key}: the file is truncated")
        tensor = buffer.view(_torch_dtype(dtype))
        return tensor.reshape([stop - start, *shape[1:]] if shape else [])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()


def read_header(file: Path, label: str = "") -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts."""
    with open(file, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            if not 0 < size < (100 << 20):
                raise ValueError
            return json.loads(f.read(size)), 8 + size
        except ValueError:
            raise ModelError(f"{label}: {file} is not a safetensors file (its header cannot be read)") from None


def weight_files(model_dir: Path) -> list[Path]:
    """A model directory's weight files: those its model.safetensors.index.json names, else
    model.safetensors (never a checkpoint's optimizer/method/adapter files)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


class StreamWriter:
    """A safetensors file written tensor by tensor, block by block: the header (names, dtypes, shapes,
    offsets) first, then the data in the same order. Tensors are ordered by entry size, then name, as
    safetensors itself does, so every tensor stays aligned."""

    def __init__(self, path: Path, tensors: list[tuple[str, str, list[int]]], metadata: dict | None = None):
        self.order = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t[1]], t[0]))
        header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
        offset = 0
        self.sizes = {}
        for name, dtype, shape in self.order:
            size = math.prod(shape) * DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes[name] = size
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.path, self.total, self.written = path, offset, 0

    def write(self, tensor) -> None:
        import torch

        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            self.file.write(data.view(torch.uint8).numpy().data)
            self.written += data.numel() * data.element_size()

    def close(self) -> None:
        self.file.close()
        if self.written != self.total:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes of tensor data, expected {self.total}")


# ---------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS to its current RSS (Linux), so
    peak_rss_bytes() then measures one step; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since reset_peak_rss() (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

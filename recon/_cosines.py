"""Streaming storage of layer-wise cosines: a ``.npy`` array ``(steps, layers, pairs)`` written in chunks.

The header is reserved up front and rewritten with the final number of steps, so the file is a standard
``.npy`` (``numpy.load(path, mmap_mode="r")``) while memory stays flat however long the run is: the recorder
keeps one chunk on the profiling device and moves it to the host once per chunk, not once per layer per step.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import torch

_HEADER_BYTES = 256
_MAGIC = b"\x93NUMPY\x01\x00"


def _header(shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    room = _HEADER_BYTES - len(_MAGIC) - 2
    body = text.ljust(room - 1).encode("latin1") + b"\n"
    if len(body) != room:
        raise ValueError(f"cosine array shape {shape} too large for the reserved .npy header")
    return _MAGIC + room.to_bytes(2, "little") + body


def read_shape(path: str | os.PathLike) -> tuple[int, ...]:
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if not head.startswith(_MAGIC[:6]):
        raise ValueError(f"{path} is not a .npy file")
    n = int.from_bytes(head[8:10], "little")
    return tuple(ast.literal_eval(head[10 : 10 + n].decode("latin1"))["shape"])


class CosineRecorder:
    """Collects ``(layers, pairs)`` cosine rows on the device and appends them to a ``.npy`` file in chunks."""

    def __init__(
        self, path: str | os.PathLike, n_layers: int, n_pairs: int, *, device: torch.device, chunk: int = 256
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = (n_layers, n_pairs)
        self._buffer = torch.empty((chunk, n_layers, n_pairs), dtype=torch.float32, device=device)
        self._fill = 0
        self.steps = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(_header((0, *self.shape)))

    def append(self, row: torch.Tensor) -> None:
        self._buffer[self._fill].copy_(row, non_blocking=True)
        self._fill += 1
        if self._fill == len(self._buffer):
            self.flush()

    def flush(self) -> None:
        if self._fill:
            self._buffer[: self._fill].cpu().numpy().astype("<f4", copy=False).tofile(self._file)
            self.steps += self._fill
            self._fill = 0
            self._file.seek(0)
            self._file.write(_header((self.steps, *self.shape)))
            self._file.seek(0, os.SEEK_END)
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def open_cosines(path: str | os.PathLike) -> np.ndarray:
    """The recorded cosines as a read-only memory map ``(steps, layers, pairs)``; NaN marks a skipped pair."""
    shape = read_shape(path)
    if shape[0] == 0:
        return np.empty(shape, dtype=np.float32)
    return np.load(path, mmap_mode="r")

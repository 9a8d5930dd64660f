"""Streaming storage of layer-wise cosines: a ``.npy`` array ``(steps, layers, pairs)`` written in chunks.

The header is reserved up front and rewritten with the final number of steps, so the file is a standard
``.npy`` (``numpy.load(path, mmap_mode="r")``) while memory stays flat however long the run is: the recorder
keeps one chunk on the profiling device and moves it to the host once per chunk, not once per layer per step.
While a chunk is on the host the recorder also updates :class:`ConflictCounts`, the running per-(layer, pair)
counts that the S-conflict scores are made of (as a streaming metric keeps its state), so the end of a profile
needs no second pass over the file.
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


class ConflictCounts:
    """Running counts over recorded cosines at one threshold S, per layer and task pair.

    ``below[l, p]``: records with ``cos < S`` (strict; NaN, a skipped pair, never counts), ``valid[l, p]``: the
    recorded (non-NaN) ones, ``total[l, p]``: their sum (float64), ``steps``: rows seen. Updating chunk by chunk
    gives exactly the counts of one pass over the whole array.
    """

    def __init__(self, n_layers: int, n_pairs: int, S: float) -> None:
        self.S = float(S)
        self.steps = 0
        self.below = np.zeros((n_layers, n_pairs), dtype=np.int64)
        self.valid = np.zeros((n_layers, n_pairs), dtype=np.int64)
        self.total = np.zeros((n_layers, n_pairs), dtype=np.float64)

    def update(self, chunk: np.ndarray) -> None:
        """Add ``(steps, layers, pairs)`` cosine rows."""
        chunk = np.asarray(chunk, dtype=np.float32)
        ok = ~np.isnan(chunk)
        self.below += (chunk < self.S).sum(axis=0)  # NaN compares False: skipped pairs never count
        self.valid += ok.sum(axis=0)
        self.total += np.where(ok, chunk, 0.0).astype(np.float64).sum(axis=0)
        self.steps += chunk.shape[0]

    @classmethod
    def of(cls, array: np.ndarray, S: float, block: int = 4096) -> ConflictCounts:
        """The counts of a whole (memory-mapped) array, read once in blocks of steps."""
        counts = cls(array.shape[1], array.shape[2], S)
        for start in range(0, array.shape[0], block):
            counts.update(array[start : start + block])
        return counts


class CosineRecorder:
    """Collects ``(layers, pairs)`` cosine rows on the device and appends them to a ``.npy`` file in chunks.

    ``path=None`` keeps no file (a process other than rank 0); ``counts`` is updated either way.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        n_layers: int,
        n_pairs: int,
        *,
        device: torch.device,
        chunk: int = 256,
        S: float = 0.0,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.shape = (n_layers, n_pairs)
        self.counts = ConflictCounts(n_layers, n_pairs, S)
        self._buffer = torch.empty((chunk, n_layers, n_pairs), dtype=torch.float32, device=device)
        self._fill = 0
        self.steps = 0
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._file.write(_header((0, *self.shape)))

    def append(self, row: torch.Tensor) -> None:
        self._buffer[self._fill].copy_(row, non_blocking=True)
        self._fill += 1
        if self._fill == len(self._buffer):
            self.flush()

    def flush(self) -> None:
        if not self._fill:
            return
        rows = self._buffer[: self._fill].cpu().numpy().astype("<f4", copy=False)
        self.counts.update(rows)
        self.steps += self._fill
        self._fill = 0
        if self._file is not None:
            rows.tofile(self._file)
            self._file.seek(0)
            self._file.write(_header((self.steps, *self.shape)))
            self._file.seek(0, os.SEEK_END)
            self._file.flush()

    def close(self) -> None:
        if self._file is None:
            self.flush()
        elif not self._file.closed:
            self.flush()
            self._file.close()


def open_cosines(path: str | os.PathLike) -> np.ndarray:
    """The recorded cosines as a read-only memory map ``(steps, layers, pairs)``; NaN marks a skipped pair."""
    shape = read_shape(path)
    if shape[0] == 0:
        return np.empty(shape, dtype=np.float32)
    return np.load(path, mmap_mode="r")

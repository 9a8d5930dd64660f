"""Streamed ``.npy`` arrays of per-step records: the layer-wise cosines and the per-layer Gram matrices.

A profile writes one row per recorded step into ``cosines.npy`` ``(steps, layers, pairs)`` and ``gram.npy``
``(steps, layers, K + pairs)``. :class:`StreamedArray` keeps each file a valid ``.npy`` from its first byte:
a fixed-size header is written and flushed when the file is created (shape ``(0, ...)``), whole rows are
appended, and only then is the header rewritten with the new number of rows. A process killed at any point
leaves a file that ``numpy.load(path, mmap_mode="r")`` reads, holding every row whose header update landed.
Memory stays flat however long the run is: rows wait on the profiling device and move to the host once per
chunk (on the CPU, where there is nothing to amortise, every row is written at once; elsewhere at least every
few seconds, so a killed GPU profile loses at most those seconds). While rows are on the host the recorder
updates its running statistic (:class:`ConflictCounts`, :class:`GramSums`), as a streaming metric keeps its
state, so the end of a profile needs no second pass over the files.
"""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from recon._errors import ReconError

_HEADER_BYTES = 256
_MAGIC = b"\x93NUMPY\x01\x00"
FLUSH_SECONDS = 5.0  # off the CPU: the longest a recorded row waits on the device before it is written


def _header(shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    room = _HEADER_BYTES - len(_MAGIC) - 2
    body = text.ljust(room - 1).encode("latin1") + b"\n"
    if len(body) != room:
        raise ValueError(f"array shape {shape} too large for the reserved .npy header")
    return _MAGIC + room.to_bytes(2, "little") + body


def read_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape a streamed array's header declares; a :class:`ReconError` naming the file and the fix when the
    file is not a ``.npy`` or holds fewer bytes than its header declares (a truncated copy)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < 10 or not head.startswith(_MAGIC[:6]):
        raise ReconError(f"{path} is not a .npy array ({len(head)} bytes of header); re-run `recon profile`")
    n = int.from_bytes(head[8:10], "little")
    try:
        meta = ast.literal_eval(head[10 : 10 + n].decode("latin1"))
        shape, dtype = tuple(meta["shape"]), np.dtype(meta["descr"])
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise ReconError(f"{path} has an unreadable .npy header; re-run `recon profile`") from None
    needed = 10 + n + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < needed:
        rows = (size - 10 - n) // max(int(np.prod(shape[1:])) * dtype.itemsize, 1) if shape else 0
        raise ReconError(
            f"{path} is truncated: its header declares {shape[0]} steps but the file holds {max(rows, 0)} "
            "(copied or written incompletely); copy it again or re-run `recon profile`"
        )
    return shape


def open_array(path: str | os.PathLike) -> np.ndarray:
    """A streamed array as a read-only memory map (checked first: :func:`read_shape`)."""
    shape = read_shape(path)
    if shape[0] == 0:
        return np.empty(shape, dtype=np.float32)
    return np.load(path, mmap_mode="r")


open_cosines = open_array  # the recorded cosines ``(steps, layers, pairs)``; NaN marks a skipped pair


class RunningStat(Protocol):
    """What a recorder updates with each block of rows it moves to the host."""

    def update(self, rows: np.ndarray) -> None: ...


class _PerStepRows:
    """Per-step rows appended chunk by chunk to ``_per_step``, joined into one array when read."""

    _per_step: list[np.ndarray]

    @property
    def per_step(self) -> np.ndarray:
        if len(self._per_step) > 1:
            self._per_step = [np.concatenate(self._per_step)]
        return self._per_step[0]


class ConflictCounts(_PerStepRows):
    """Running counts over recorded cosines at one threshold S, per layer and task pair.

    ``below[l, p]``: records with ``cos < S`` (strict; NaN, a skipped pair, never counts), ``valid[l, p]``: the
    recorded (non-NaN) ones, ``total[l, p]``: their sum (float64), ``steps``: rows seen; ``per_step``:
    ``(steps, layers)``, each step's count of pairs below S (the rows the confidence bootstrap resamples).
    Updating block by block gives exactly the counts of one pass over the whole array.
    """

    def __init__(self, n_layers: int, n_pairs: int, S: float) -> None:
        self.S = float(S)
        self.steps = 0
        self.below = np.zeros((n_layers, n_pairs), dtype=np.int64)
        self.valid = np.zeros((n_layers, n_pairs), dtype=np.int64)
        self.total = np.zeros((n_layers, n_pairs), dtype=np.float64)
        self._per_step: list[np.ndarray] = [np.zeros((0, n_layers), dtype=np.int64)]

    def update(self, chunk: np.ndarray) -> None:
        """Add ``(steps, layers, pairs)`` cosine rows."""
        chunk = np.asarray(chunk, dtype=np.float32)
        ok = ~np.isnan(chunk)
        below = chunk < self.S  # NaN compares False: skipped pairs never count
        self.below += below.sum(axis=0)
        self.valid += ok.sum(axis=0)
        self.total += np.where(ok, chunk, 0.0).astype(np.float64).sum(axis=0)
        self._per_step.append(below.sum(axis=2, dtype=np.int64))
        self.steps += chunk.shape[0]

    @classmethod
    def of(cls, array: np.ndarray, S: float, block: int = 4096) -> ConflictCounts:
        """The counts of a whole (memory-mapped) array, read once in blocks of steps."""
        counts = cls(array.shape[1], array.shape[2], S)
        for start in range(0, array.shape[0], block):
            counts.update(array[start : start + block])
        return counts


class GramSums(_PerStepRows):
    """Running sums over recorded Gram rows ``(steps, layers, K + pairs)``: the K squared norms, then the pairs'
    dot products ``<g_i, g_j>`` in the cosines' pair order.

    ``dots[l, p]``: the sum over steps of pair p's dot product on layer l (float64); ``per_step``:
    ``(steps, layers)``, each step's interference ``sum_{i<j} -<g_i, g_j>``.
    """

    def __init__(self, n_layers: int, n_tasks: int) -> None:
        self.n_tasks = n_tasks
        self.steps = 0
        self.dots = np.zeros((n_layers, n_tasks * (n_tasks - 1) // 2), dtype=np.float64)
        self._per_step: list[np.ndarray] = [np.zeros((0, n_layers), dtype=np.float64)]

    def update(self, chunk: np.ndarray) -> None:
        dots = np.asarray(chunk, dtype=np.float64)[:, :, self.n_tasks :]
        self.dots += dots.sum(axis=0)
        self._per_step.append(-dots.sum(axis=2))
        self.steps += dots.shape[0]

    @classmethod
    def of(cls, array: np.ndarray, n_tasks: int, block: int = 4096) -> GramSums:
        sums = cls(array.shape[1], n_tasks)
        for start in range(0, array.shape[0], block):
            sums.update(array[start : start + block])
        return sums


class StreamedArray:
    """Collects float32 rows of one shape on the device and appends them to a ``.npy`` file, valid from the
    first byte (module docstring); ``stat`` sees every row once, on the host, a chunk at a time.

    ``path=None`` keeps no file (a process other than rank 0); ``stat`` is updated either way. Rows
    ``[0, _written)`` of the buffer are on disk, ``[_written, _fill)`` wait on the device.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        row_shape: tuple[int, ...],
        stat: RunningStat,
        *,
        device: torch.device,
        chunk: int = 256,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.shape = tuple(row_shape)
        self.stat = stat
        self._buffer = torch.empty((max(chunk, 1), *self.shape), dtype=torch.float32, device=device)
        self._every_row = device.type == "cpu"
        self._fill = self._written = 0
        self._last_write = time.monotonic()
        self.steps = 0  # rows on disk (or, without a file, rows handed over)
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
            self._file.write(_header((0, *self.shape)))

    def append(self, row: torch.Tensor) -> None:
        self._buffer[self._fill].copy_(row, non_blocking=True)
        self._fill += 1
        if self._fill == len(self._buffer):
            self.flush()
        elif self._every_row or time.monotonic() - self._last_write > FLUSH_SECONDS:
            self._write()

    def _write(self) -> None:
        """Append the rows waiting on the device, whole, then rewrite the header to count them."""
        self._last_write = time.monotonic()
        if self._fill == self._written:
            return
        rows = self._buffer[self._written : self._fill].cpu().numpy()
        self.steps += self._fill - self._written
        self._written = self._fill
        if self._file is not None:
            self._file.write(rows.astype("<f4", copy=False).tobytes())
            os.pwrite(self._file.fileno(), _header((self.steps, *self.shape)), 0)

    def flush(self) -> None:
        """Write what waits, hand the buffered rows to ``stat``, and start a new chunk."""
        self._write()
        if self._fill:
            self.stat.update(self._buffer[: self._fill].cpu().numpy())
        self._fill = self._written = 0

    def close(self) -> None:
        if self._file is None or not self._file.closed:
            self.flush()
        if self._file is not None:
            self._file.close()


class CosineRecorder(StreamedArray):
    """``(layers, pairs)`` cosine rows into ``cosines.npy``, with :class:`ConflictCounts` at ``S`` as ``counts``."""

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
        self.counts = ConflictCounts(n_layers, n_pairs, S)
        super().__init__(path, (n_layers, n_pairs), self.counts, device=device, chunk=chunk)


class GramRecorder(StreamedArray):
    """``(layers, K + pairs)`` Gram rows into ``gram.npy`` (:func:`gram_rows`), with :class:`GramSums` as
    ``sums``."""

    def __init__(
        self, path: str | os.PathLike | None, n_layers: int, n_tasks: int, *, device: torch.device, chunk: int = 256
    ) -> None:
        self.sums = GramSums(n_layers, n_tasks)
        super().__init__(
            path, (n_layers, n_tasks + n_tasks * (n_tasks - 1) // 2), self.sums, device=device, chunk=chunk
        )


def gram_rows(gram: torch.Tensor) -> torch.Tensor:
    """``(L, K + pairs)`` from ``(L, K, K)`` Gram matrices: the diagonal, then the pairs in
    ``triu_indices(K, K, 1)`` order (the cosines' order)."""
    K = gram.shape[-1]
    pair_i, pair_j = torch.triu_indices(K, K, offset=1, device=gram.device)
    return torch.cat([gram.diagonal(dim1=1, dim2=2), gram[:, pair_i, pair_j]], dim=1)

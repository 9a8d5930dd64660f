"""BERT tasks: a recon recipe whose model is a Hugging Face ``transformers`` encoder (tiny config, random weights).

Each of scikit-learn's bundled 8x8 digit scans (no download) is read as a sequence of 16 tokens: every token is
one 2x2 patch of the scan, quantised to 4 levels per pixel (256 token ids). A 4-layer ``BertModel`` (hidden 32)
encodes the sequence; three heads read it:

* ``digit``: which digit (10 classes), from the [CLS]-position state;
* ``parity``: even or odd (2 classes), from BERT's pooler output;
* ``ink``: how much ink the scan holds (regression), from the mean of the token states.

``torch.fx`` cannot trace ``BertModel``; recon captures it with ``torch.export`` from the first batch, so no
``--leaf`` is needed and any layer of the encoder can be branched on its own:

    recon profile examples/bert_tasks.py --steps 20 && recon split --top-k 2 && recon train examples/bert_tasks.py
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

TASKS = ("digit", "parity", "ink")
BATCH_SIZE = int(os.environ.get("RECON_BERT_BATCH", 32))
VOCAB = 256
SEQ = 16


@functools.lru_cache(maxsize=2)
def tokens(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids (n, 16), digit labels (n,), ink (n,))`` from one of two fixed halves of the digit scans."""
    digits = load_digits()
    levels = np.minimum(digits.images.astype(np.int64) // 4, 3)  # 0..16 -> 4 levels
    patches = levels.reshape(-1, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(-1, SEQ, 4)
    ids = (patches * np.array([64, 16, 4, 1])).sum(-1)  # one id per 2x2 patch, in 0..255
    order = np.random.default_rng(0).permutation(len(ids))
    part = order[: len(order) * 3 // 4] if split == "train" else order[len(order) * 3 // 4 :]
    ink = digits.images.reshape(len(ids), -1).mean(1) / 16.0
    return (
        torch.from_numpy(ids[part]),
        torch.from_numpy(digits.target[part].astype(np.int64)),
        torch.from_numpy(ink[part].astype(np.float32)),
    )


class TaskTargets(TensorDataset):
    """Yields ``(ids, {task: target})`` so the default collate builds the recipe's target dict."""

    def __getitem__(self, i: int):
        ids, label, ink = super().__getitem__(i)
        return ids, {"digit": label, "parity": label % 2, "ink": ink}


class BertTasks(nn.Module):
    """A tiny ``transformers.BertModel`` shared by three heads; returns ``{task: output}``."""

    def __init__(self, layers: int = 4, hidden: int = 32) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=SEQ + 2,
        )
        self.bert = BertModel(config)
        self.digit = nn.Linear(hidden, 10)
        self.parity = nn.Linear(hidden, 2)
        self.ink = nn.Linear(hidden, 1)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.bert(input_ids=ids)
        states = out.last_hidden_state
        return {
            "digit": self.digit(states[:, 0]),
            "parity": self.parity(out.pooler_output),
            "ink": self.ink(states.mean(1)).squeeze(-1),
        }


def build_model() -> nn.Module:
    return BertTasks()


losses = {
    "digit": F.cross_entropy,
    "parity": F.cross_entropy,
    "ink": F.mse_loss,
}


def _loader(split: str, shuffle: bool) -> DataLoader:
    return DataLoader(TaskTargets(*tokens(split)), batch_size=BATCH_SIZE, shuffle=shuffle, drop_last=shuffle)


def train_data() -> DataLoader:
    return _loader("train", True)


def val_data() -> DataLoader:
    return _loader("val", False)


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output.argmax(-1) == target).float().mean())


metrics = {
    "digit": {"accuracy": (_accuracy, "higher")},
    "parity": {"accuracy": (_accuracy, "higher")},
    "ink": {"mse": (lambda o, t: float(F.mse_loss(o, t)), "lower")},
}

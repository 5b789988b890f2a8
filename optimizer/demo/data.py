"""Text that is already on every machine with Python: the English reference
pages of the Python documentation that CPython ships for ``help()``
(``pydoc_data.topics``, about 460 kB), read as bytes (a 256-symbol vocabulary,
no tokenizer to download)."""

from __future__ import annotations

import collections
import math

import torch


def load_text() -> tuple[bytes, str]:
    """The corpus and a line saying where it came from."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped Python: fall back to the standard library's docstrings
        import importlib
        import pkgutil

        docs = []
        for mod in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))[:400]:
            try:
                doc = importlib.import_module(mod).__doc__
            except Exception:  # noqa: BLE001 - any module that fails to import is simply skipped
                continue
            if doc:
                docs.append(doc)
        return "\n\n".join(docs).encode(), "standard-library module docstrings"
    return "\n\n".join(topics[k] for k in sorted(topics)).encode(), "pydoc_data.topics (Python reference docs)"


def unigram_entropy(data: bytes) -> float:
    """Entropy of the byte frequencies, in nats: the loss of a model that ignores context."""
    counts = collections.Counter(data)
    n = len(data)
    return -sum(c / n * math.log(c / n) for c in counts.values())


class Batches:
    """Random windows of ``seq_len + 1`` bytes; the generator's state is part of a checkpoint."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        if len(data) <= seq_len + 1:
            raise ValueError(f"Invalid seq_len: {seq_len} is longer than the text ({len(data)} bytes)")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        rows = torch.stack([self.data[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]


def split(data: bytes, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the first 90 %, measure on the last 10 % (never seen in training)."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    cut = int(len(t) * (1 - held_out))
    return t[:cut], t[cut:]

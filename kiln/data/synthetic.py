"""A random order-1 Markov chain: a token source whose entropy rate is known exactly.

Training on it is an oracle for the whole loop: a correct model/optimizer/schedule drives
eval loss down to `entropy_rate()` nats per token and no lower.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from kiln.errors import KilnError


class MarkovSource:
    def __init__(self, vocab: int, seed: int, concentration: float = 0.3):
        rng = np.random.default_rng(seed)
        self.transition = torch.from_numpy(rng.dirichlet(np.full(vocab, concentration), size=vocab))
        self.vocab = vocab

    def stationary(self) -> torch.Tensor:
        evals, evecs = torch.linalg.eig(self.transition.T)
        v = evecs[:, torch.argmin((evals - 1).abs())].real
        return v / v.sum()

    def entropy_rate(self) -> float:
        """H = sum_i pi_i * H(P_i) in nats per token."""
        p = self.transition
        row_entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=1)
        return float((self.stationary() * row_entropy).sum())

    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = torch.multinomial(self.stationary().clamp_min(0).float(), batch, replacement=True, generator=generator)
        probs = self.transition.float()
        for t in range(1, length):
            out[:, t] = torch.multinomial(probs[out[:, t - 1]], 1, generator=generator).squeeze(1)
        return out


def switching_unigram(batch: int, length: int, vocab: int, segment: int, g: torch.Generator) -> torch.Tensor:
    """(batch, length) tokens drawn from a peaked unigram distribution that is redrawn at random
    boundaries about every `segment` tokens: the best prediction weighs recent tokens over older
    ones, so a model must use distance, which is what length-extrapolation tests need."""
    out = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        t = 0
        while t < length:
            n = int(torch.randint(segment // 2, segment * 3 // 2 + 1, (1,), generator=g))
            weights = (-torch.log(torch.rand(vocab, generator=g))) ** (1 / 0.3)
            out[b, t:t + n] = torch.multinomial(weights / weights.sum(), min(n, length - t), replacement=True,
                                                generator=g)
            t += n
    return out


class MarkovLoader:
    """Batches of Markov sequences. Batch g of the global stream is a pure function of (seed, split, g),
    and DP rank r of n takes g = i*n + r for its i-th batch, so the global batch of a step is the same
    for every DP size: resume exactly, or across layouts."""

    def __init__(self, source: MarkovSource, *, seq_len: int, micro_batch: int, seed: int, dp_rank: int,
                 dp_size: int, split: str, max_batches: int | None = None):
        self.source, self.seq_len, self.micro_batch = source, seq_len, micro_batch
        self.seed, self.dp_rank, self.dp_size, self.split = seed, dp_rank, dp_size, split
        self.max_batches = max_batches
        self.batches_yielded = 0

    def __iter__(self):
        index = self.batches_yielded if self.split == "train" else 0
        while self.max_batches is None or index < self.max_batches:
            global_index = index * self.dp_size + self.dp_rank
            g = torch.Generator().manual_seed(_batch_seed(self.seed, self.split, global_index))
            window = self.source.sample(self.micro_batch, self.seq_len + 1, g)
            index += 1
            if self.split == "train":
                self.batches_yielded = index
            yield {"input": window[:, :-1], "target": window[:, 1:]}

    def state_dict(self) -> dict:
        return {"kind": "markov", "batches_yielded": self.batches_yielded, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "markov":
            raise KilnError("the checkpoint's data-loader state comes from prepared shards, but this run uses "
                            "data.synthetic=markov: resume with the same data, or start a new train.name")
        self.batches_yielded = int(state["batches_yielded"])

    @staticmethod
    def remap_state(states: dict, dp_rank: int, dp_size: int) -> dict:
        """Ranks advance in lockstep, so the global position is batches_yielded * old DP size."""
        old = next(iter(states.values()))
        consumed = old["batches_yielded"] * old["dp_size"]
        if consumed % dp_size:
            raise KilnError(f"data loader state: {consumed} global batches consumed cannot be split over "
                            f"{dp_size} data-parallel ranks without repeating or skipping one")
        return {"kind": "markov", "batches_yielded": consumed // dp_size, "dp_size": dp_size}


def _batch_seed(seed: int, split: str, index: int) -> int:
    """Stable across processes (Python's str hash is salted per process)."""
    return zlib.crc32(f"{seed}/{split}/{index}".encode())

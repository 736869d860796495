"""Which images each training iteration sees: a deterministic stream of batches, optionally
with LVIS repeat-factor sampling.

Every batch is a function of (seed, iteration) only, so a resumed run sees exactly the
batches (and augmentation seeds) an uninterrupted one would have.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SeedSequence spreads nearby inputs apart)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def repeat_factors(image_labels: Sequence[set[int]], threshold: float) -> np.ndarray:
    """LVIS repeat factors (Gupta et al., LVIS, 2019) per image.

    f_c = fraction of training images that contain category c;
    r_c = max(1, sqrt(t / f_c));  r_i = max over the categories c in image i of r_c
    (1 for an image without objects).

    Args:
        image_labels: per image, the set of its category labels.
        threshold: t (LVIS uses 0.001).
    Returns:
        (num_images,) float64 factors >= 1.
    """
    n = len(image_labels)
    counts: dict[int, int] = {}
    for labels in image_labels:
        for c in labels:
            counts[c] = counts.get(c, 0) + 1
    r_c = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.array([max((r_c[c] for c in labels), default=1.0) for labels in image_labels], dtype=np.float64)


class IterationBatchSampler(torch.utils.data.Sampler):
    """Batches ``start .. total - 1`` as lists of ``(position, augmentation seed)``.

    Positions come from the concatenation of per-epoch permutations; batch ``i`` takes
    stream entries ``[i * batch_size, (i + 1) * batch_size)``. Without ``factors`` an epoch
    is a permutation of ``range(n)``; with repeat ``factors`` r_i an epoch holds image i
    ``floor(r_i) + Bernoulli(r_i - floor(r_i))`` times (stochastic rounding, drawn per
    epoch), shuffled — so rare-category images are seen about r_i times as often.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int,
                 factors: np.ndarray | None = None) -> None:
        if n < 1:
            raise ValueError("cannot train on an empty dataset")
        if factors is not None and (len(factors) != n or np.any(np.asarray(factors) < 1)):
            raise ValueError("repeat factors: need one factor >= 1 per image")
        self.n, self.batch_size, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.factors = None if factors is None else np.asarray(factors, dtype=np.float64)

    def epoch_indices(self, epoch: int) -> list[int]:
        """The image positions of ``epoch``, in the order they are used."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        if self.factors is None:
            return torch.randperm(self.n, generator=gen).tolist()
        frac = self.factors - np.floor(self.factors)
        extra = torch.rand(self.n, generator=gen, dtype=torch.float64).numpy() < frac
        reps = np.floor(self.factors).astype(np.int64) + extra
        indices = np.repeat(np.arange(self.n), reps)
        order = torch.randperm(len(indices), generator=gen).numpy()
        return indices[order].tolist()

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Walk the epochs up to the first batch (epochs have different lengths with repeat
        # factors), then hand out consecutive stream entries.
        epoch, epoch_start = 0, 0
        current = self.epoch_indices(0)
        first = self.start * self.batch_size
        while epoch_start + len(current) <= first:
            epoch_start += len(current)
            epoch += 1
            current = self.epoch_indices(epoch)
        pos = first
        for it in range(self.start, self.total):
            batch = []
            for slot in range(self.batch_size):
                while pos - epoch_start >= len(current):
                    epoch_start += len(current)
                    epoch += 1
                    current = self.epoch_indices(epoch)
                batch.append((current[pos - epoch_start], mix_seed(self.seed, it, slot, 1)))
                pos += 1
            yield batch

"""Drift monitoring's numbers: what is measured of each input, and how a window of served traffic is compared
with the model's reference (its validation data).

The server logs `image_stats` of every image it classifies (ptpipe.predlog) and the reference holds the same
statistics of the validation split, so the two are compared like for like."""
from __future__ import annotations

import numpy as np

IMAGE_STATS = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")
TEXT_STATS = ("prompt_chars", "bits_per_char")


def image_stats(images: np.ndarray) -> np.ndarray:
    """uint8 N x 3 x S x S (the model's input) -> float32 N x 6: per-channel mean and std on the 0-255 scale.

    Cheap (one pass over the pixels), and what brightness, contrast, noise and blur shifts move first."""
    x = images.reshape(images.shape[0], 3, -1).astype(np.float32)
    return np.concatenate([x.mean(axis=2), x.std(axis=2)], axis=1)

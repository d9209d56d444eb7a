"""Digits data and the prompt vocabulary of the tiny model.

Images are sklearn's bundled 8x8 ``load_digits`` upsampled to 16x16, so
training needs no download. A fixed stratified split keeps 300 images out
of every training run (diffusion model and classifier alike).
"""

import re

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
HELDOUT_SIZE = 300
SPLIT_SEED = 0

DIGIT_WORDS = ("zero", "one", "two", "three", "four",
               "five", "six", "seven", "eight", "nine")

# {n}: numeral, {w}: English word.
prompt_templates = (
    "{n}",
    "{w}",
    "a handwritten digit {n}",
    "the number {w}",
    "a drawing of the digit {w}",
    "digit {n}",
)


def prompts_for(digit):
    """All template prompts that ask for ``digit``."""
    return [t.format(n=digit, w=DIGIT_WORDS[digit]) for t in prompt_templates]


def digit_of(prompt):
    """The digit a prompt asks for (numeral or word), or None."""
    for token in re.findall(r"[a-z]+|\d+", prompt.lower()):
        if token in DIGIT_WORDS:
            return DIGIT_WORDS.index(token)
        if len(token) == 1 and token.isdigit():
            return int(token)
    return None


def upsample(images8):
    """(N, 8, 8) values 0..16 -> (N, 1, 16, 16) float32 in [0, 1]."""
    x = torch.as_tensor(np.asarray(images8), dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], size=IMAGE_SIZE, mode="bilinear",
                      align_corners=False)
    return x.clamp(0.0, 1.0)


def split_indices(labels):
    """Fixed stratified (train, held-out) index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, held = train_test_split(idx, test_size=HELDOUT_SIZE,
                                   stratify=labels, random_state=SPLIT_SEED)
    return np.sort(train), np.sort(held)


def load_split(split):
    """Images (N, 1, 16, 16) in [0, 1] and int64 labels of "train"/"heldout"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, held = split_indices(digits.target)
    idx = {"train": train, "heldout": held}[split]
    images = upsample(digits.images[idx])
    return images, torch.as_tensor(digits.target[idx], dtype=torch.int64)

"""A tiny CNN that says which digit a 16x16 image shows.

It is the automatic judge of the tiny diffusion model: trained only on the
train split, checked on the held-out split, stored as safetensors (no
pickle).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SIZE

CLASSIFIER_DIR = Path(__file__).resolve().parent / "classifier_weights"
WEIGHTS_NAME = "digit_cnn.safetensors"


class DigitNet(nn.Module):
    """Two conv+pool stages (16 -> 8 -> 4) and a linear read-out."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _shift(x, gen, pad=1):
    """Random +-pad pixel translation; generated digits are not centred
    exactly like the scans."""
    n = x.shape[0]
    padded = F.pad(x, (pad,) * 4)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    rows = [padded[i, :, dy[i]:dy[i] + IMAGE_SIZE, dx[i]:dx[i] + IMAGE_SIZE]
            for i in range(n)]
    return torch.stack(rows)


def train_classifier(images, labels, seed=0, epochs=40, batch=64, lr=3e-3):
    """Fit a DigitNet on (N, 1, 16, 16) images in [0, 1]."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(net(_shift(images[idx], gen)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def save_classifier(net, out_dir=CLASSIFIER_DIR):
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    return out / WEIGHTS_NAME


def load_classifier(path=None):
    """The committed DigitNet in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path else CLASSIFIER_DIR / WEIGHTS_NAME
    net = DigitNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def _as_array(images):
    """Any supported input -> float numpy array, channels last."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu().numpy()
        # torch images are channels-first: CHW or NCHW
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = np.moveaxis(x, 0, -1)
        elif x.ndim == 4:
            x = np.moveaxis(x, 1, -1)
        return x
    if isinstance(images, (list, tuple)):
        return np.stack([_as_array(im) for im in images])
    if hasattr(images, "convert"):  # PIL image
        return np.asarray(images.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(images, dtype=np.float32)


def to_batch(images):
    """Normalise input to a (N, 1, 16, 16) float tensor in [0, 1].

    Accepts PIL images, numpy arrays (HW, HWC, NHW, NHWC) or torch tensors
    (HW, CHW, NHW, NCHW); grayscale or RGB; values in [0, 1] or [-1, 1]
    (any negative value means [-1, 1], since backgrounds are then -1).
    """
    x = _as_array(images)
    if x.ndim >= 3 and x.shape[-1] in (1, 3):
        x = x.mean(axis=-1)
    if x.ndim == 2:
        x = x[None]
    if x.min() < 0:
        x = (x + 1.0) / 2.0
    t = torch.as_tensor(np.clip(x, 0.0, 1.0), dtype=torch.float32)[:, None]
    if t.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        t = F.interpolate(t, size=IMAGE_SIZE, mode="bilinear",
                          align_corners=False)
    return t


_default_net = None


def classify(images, net=None):
    """Predicted digits (int numpy array) for a batch or a single image."""
    global _default_net
    if net is None:
        if _default_net is None:
            _default_net = load_classifier()
        net = _default_net
    with torch.no_grad():
        return net(to_batch(images)).argmax(1).numpy()

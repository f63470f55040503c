"""Training-time augmentation applied to calibration inputs.

Why: a network fits its (augmented) training images; its deep activations on the clean
training images differ from those on unseen images. Statistics re-estimated on clean
training images (USP) then mismatch the test distribution — on the pretrained ResNet-20,
re-estimating BN on 1024 clean training images costs 3 points even in float, while the
same images with crop-and-flip augmentation keep the float accuracy.
"""
from __future__ import annotations

import torch


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad-and-crop plus horizontal flip of NCHW images (the CIFAR training recipe).

    The border is filled with each channel's smallest value in the batch, which for
    normalised photographs is black — what the usual pipeline pads with before normalising.
    The random draws come from ``generator`` on its own device (a CPU generator: the same
    images on any device) and are then moved to ``x``'s: drawn with a CPU generator, they
    met CUDA images in ``torch.where`` and the indexing and failed.
    """
    if x.dim() != 4:
        raise ValueError("random_crop_flip expects NCHW images")
    n, c, h, w = x.shape
    g = generator or torch.Generator().manual_seed(0)
    if flip:
        mirrored = (torch.rand(n, generator=g, device=g.device) < 0.5).to(x.device)
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    if padding <= 0:
        return x
    fill = x.amin(dim=(0, 2, 3))[None, :, None, None]
    padded = fill.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=g, device=g.device).to(x.device)
    rows = (offsets[:, 0, None] + torch.arange(h, device=x.device)[None, :])            # [n, h]
    cols = (offsets[:, 1, None] + torch.arange(w, device=x.device)[None, :])            # [n, w]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()

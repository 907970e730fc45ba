"""Training augmentations of fine-tuning: SpecAugment (both loaders apply it to their batches) and
mixup (the fine-tuning loop applies it, since it mixes the targets too).

Both draw their random numbers on the host from a generator seeded by (seed, epoch, batch), so both
loaders agree and a resumed run repeats them; the masks themselves are built on the batch's device with
fixed shapes (no host sync).
"""

from __future__ import annotations

import numpy as np
import torch


def batch_rng(*key: int) -> np.random.Generator:
    """A host generator seeded from non-negative integers (seed, epoch, batch, purpose)."""
    return np.random.default_rng([int(k) for k in key])


def _band(n: int, length: int, width_max: int, g: np.random.Generator, device) -> torch.Tensor:
    """[n, length] bool: per sample a band of width floor(u * width_max) starting at
    floor(u' * (length - width)), torchaudio's `mask_along_axis` rule."""
    u = torch.from_numpy(g.random((n, 2)))
    width = (u[:, 0] * width_max).floor()
    start = (u[:, 1] * (length - width)).floor()
    pos = torch.arange(length).view(1, -1)
    band = (pos >= start.view(-1, 1)) & (pos < (start + width).view(-1, 1))
    return band.to(device, non_blocking=True)


def spec_augment(audio: torch.Tensor, freqm: int, timem: int, fill: float, g: np.random.Generator) -> torch.Tensor:
    """CAV-MAE's SpecAugment on a batch of fbanks [B, T, F]: one frequency band of width < `freqm` and
    one time band of width < `timem` per clip set to `fill` (the normalised value of a zero fbank, as
    CAV-MAE masks before normalising)."""
    if not (freqm or timem):
        return audio
    b, t, f = audio.shape
    mask = torch.zeros(b, t, f, dtype=torch.bool, device=audio.device)
    if freqm:
        mask |= _band(b, f, min(freqm, f), g, audio.device)[:, None, :]
    if timem:
        mask |= _band(b, t, min(timem, t), g, audio.device)[:, :, None]
    return audio.masked_fill(mask, fill)


def mixup(audio: torch.Tensor, image: torch.Tensor, target: torch.Tensor, prob: float, g: np.random.Generator,
          alpha: float = 10.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAV-MAE's mixup: each clip, with probability `prob`, is mixed with a partner (here the batch in
    reverse order) by lambda ~ Beta(alpha, alpha), one lambda for its audio, image and target."""
    if prob <= 0:
        return audio, image, target
    n = audio.shape[0]
    lam = np.where(g.random(n) < prob, g.beta(alpha, alpha, n), 1.0)
    lam = torch.from_numpy(lam).float().to(audio.device, non_blocking=True)

    def mix(x: torch.Tensor) -> torch.Tensor:
        w = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return w * x + (1 - w) * x.flip(0)

    return mix(audio), mix(image), mix(target)

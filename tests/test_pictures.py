"""Patch layout helpers, and that every picture is a valid, non-blank PNG that depends on its input."""

import numpy as np
import pytest
import torch
from PIL import Image

from crossmae_fast.config import IMAGENET_MEAN, IMAGENET_STD
from crossmae_fast.eval import pictures as pic


def test_patchify_roundtrip_and_layout():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 20, 12, generator=g)
    x = pic.patchify_image(imgs, 4)
    assert x.shape == (2, 15, 48)
    # token (r, c) holds pixel (r*p + i, c*p + j) of channel ch at position (i*p + j)*3 + ch
    r, c, i, j, ch = 3, 2, 1, 3, 2
    assert x[1, r * 3 + c, (i * 4 + j) * 3 + ch] == imgs[1, ch, r * 4 + i, c * 4 + j]
    assert torch.equal(pic.unpatchify_image(x, 4, grid=(5, 3)), imgs)
    spec = torch.randn(2, 24, 8, generator=g)
    a = pic.patchify_audio(spec, 4)
    assert a.shape == (2, 12, 16)
    # time-major: token t * (F/p) + f
    t, f = 4, 1
    assert torch.equal(a[0, t * 2 + f].reshape(4, 4), spec[0, t * 4:(t + 1) * 4, f * 4:(f + 1) * 4])
    assert torch.equal(pic.unpatchify_audio(a, 4, (6, 2)), spec)
    with pytest.raises(ValueError):
        pic.unpatchify_audio(a, 4, (4, 2))


def test_denormalise_inverts_imagenet_normalisation():
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(3, 5, 7, generator=g)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    out = pic.denormalise_image((rgb - mean) / std)
    np.testing.assert_allclose(out, rgb.permute(1, 2, 0).numpy(), atol=1e-6)
    np.testing.assert_allclose(pic.to_display((rgb.permute(1, 2, 0) * 255).to(torch.uint8).numpy()),
                               (rgb.permute(1, 2, 0) * 255).to(torch.uint8).numpy() / 255)


def read_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def check_pictures(make, tmp_path):
    """Two different inputs give two valid, non-blank, different pictures."""
    a, b = read_png(make(0, tmp_path / "a.png")), read_png(make(1, tmp_path / "b.png"))
    assert a.std() > 20 and b.std() > 20
    assert a.shape != b.shape or np.abs(a - b).mean() > 1


def frame(seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, size, size, generator=g)


def spec(seed, t=64, f=16):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(t, f, generator=g).cumsum(0) / 4


def test_localization_picture(tmp_path):
    def make(seed, path):
        g = torch.Generator().manual_seed(seed)
        heat = torch.rand(7, 7, generator=g)
        boxes = [[0.1, 0.2, 0.6, 0.9], [0.3, 0.1, 0.8, 0.5]][: seed + 1]
        return pic.plot_localization(frame(seed), heat, boxes, path, title=f"clip {seed}")
    check_pictures(make, tmp_path)


def test_attentive_tokens_picture(tmp_path):
    def make(seed, path):
        g = torch.Generator().manual_seed(seed)
        img_mask = (torch.rand(16, generator=g) > 0.5).float()  # 4x4 grid of 8 px patches
        aud_mask = (torch.rand(16, generator=g) > 0.5).float()  # 64x16 spectrogram: 8 (time) x 2 patches
        img_tok = torch.nonzero(img_mask == 0).ravel()[:2]
        aud_tok = torch.nonzero(aud_mask == 0).ravel()[:4]
        return pic.plot_attentive_tokens(frame(seed), img_tok, spec(seed), aud_tok, path, image_patch=8,
                                         audio_patch=8, image_mask=img_mask, audio_mask=aud_mask)
    check_pictures(make, tmp_path)
    with pytest.raises(ValueError, match="outside"):
        pic.plot_attentive_tokens(frame(0), [16], spec(0), [0], tmp_path / "x.png", image_patch=8,
                                  audio_patch=8)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_query_attention_picture(tmp_path, modality):
    def make(seed, path):
        g = torch.Generator().manual_seed(seed)
        grid = (4, 4) if modality == "image" else (8, 2)
        attn = torch.rand(3, *grid, generator=g).softmax(-1)
        bg = frame(seed) if modality == "image" else spec(seed)
        return pic.plot_query_attention(attn, bg, path, modality=modality)
    check_pictures(make, tmp_path)
    one = pic.plot_query_attention(np.ones((1, 4, 4)), frame(0), tmp_path / "one.png", labels=["q7"])
    assert read_png(one).std() > 20


def test_image_reconstruction_picture(tmp_path):
    def make(seed, path):
        g = torch.Generator().manual_seed(seed)
        img = frame(seed)
        pred = torch.randn(16, 8 * 8 * 3, generator=g)
        mask = (torch.rand(16, generator=g) > 0.25).float()
        return pic.plot_image_reconstruction(img, pred[None], mask, path, patch=8, norm_pix=bool(seed))
    check_pictures(make, tmp_path)
    with pytest.raises(ValueError, match="do not match"):
        pic.plot_image_reconstruction(frame(0), torch.zeros(15, 192), torch.zeros(15), tmp_path / "x.png", 8)


def test_audio_reconstruction_picture(tmp_path):
    def make(seed, path):
        g = torch.Generator().manual_seed(seed)
        s = spec(seed)
        pred = torch.randn(16, 64, generator=g)
        mask = (torch.rand(16, generator=g) > 0.25).float()
        return pic.plot_audio_reconstruction(s, pred, mask, path, patch=8, norm_pix=bool(seed))
    check_pictures(make, tmp_path)


def test_reconstruction_norm_pix_maps_back_to_target():
    """A perfect norm-pix prediction (the normalised target) reconstructs the target."""
    g = torch.Generator().manual_seed(4)
    target = torch.randn(6, 12, generator=g)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    pred, _ = pic._reconstruct(target, (target - mean) / (var + 1e-6).sqrt(), torch.ones(6), norm_pix=True)
    torch.testing.assert_close(pred, target.double(), rtol=1e-5, atol=1e-5)

"""FLOP accounting of `benchmarks.flops`: the ViT-B numbers of docs/design.md section 7, and torch's own FLOP counter
on small models of odd shapes (forward, and forward + backward of a train step)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flops
from crossmae_fast import CrossMAE, model_config

DESIGN_GFLOP = {"encoders": 31, "cross_conditioned": 41, "cross_embedding": 24, "target": 132}


def test_vit_b_matches_spec():
    cfg = model_config("base", "crossmae")
    parts = flops.forward_flops(cfg)
    assert set(parts) == set(DESIGN_GFLOP)
    for name, gflop in DESIGN_GFLOP.items():
        assert parts[name] / 1e9 == pytest.approx(gflop, rel=0.1), name
    assert flops.train_step_flops(cfg) / 1e9 == pytest.approx(420, rel=0.1)
    # ~1,870 samples/s at 790 TFLOP/s (docs/design.md section 7)
    assert 790e12 / flops.train_step_flops(cfg) == pytest.approx(1870, rel=0.1)


def test_variants_count_only_their_terms():
    base = flops.forward_flops(model_config("base", "crossmae"))
    assert set(flops.forward_flops(model_config("base", "cl-av"))) == {"encoders"}
    self_mae = flops.forward_flops(model_config("base", "self-mae"))
    assert set(self_mae) == {"encoders", "self_recon"}
    assert self_mae["self_recon"] < base["cross_conditioned"]  # no cross-attention layer
    large = flops.forward_flops(model_config("large", "crossmae"))
    assert large["target"] > 2.5 * base["target"]


def _odd_config(variant: str, **kw):
    """Small, deliberately uneven shapes: 6x6 image grid, 12x3 audio grid, 3 heads, mask ratio 0.6."""
    return model_config("tiny", variant, ops="reference", image_size=48, image_patch=8, audio_frames=192,
                        audio_bins=48, audio_patch=16, embed_dim=48, depth=2, num_heads=3, decoder_dim=40,
                        decoder_depth=2, decoder_heads=2, emb_decoder_depth=2, mask_ratio=0.6, mlp_ratio=3.0, **kw)


def _counted(cfg, backward: bool, batch: int = 2) -> float:
    """FLOPs per sample that torch's counter sees (math SDPA, so attention shows as matmuls)."""
    torch.manual_seed(0)
    model = CrossMAE(cfg)
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(batch, cfg.audio_frames, cfg.audio_bins, generator=g)
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(audio, image)
        if backward:
            out["loss"].backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("variant, kw", [("crossmae", {}), ("self-mae", {}),
                                         ("cl-crossemb-mae", {"queries": "target-tokens"}),
                                         ("crossmae", {"contrastive_inputs": "masked"})])
def test_forward_matches_flop_counter(variant, kw):
    cfg = _odd_config(variant, **kw)
    assert _counted(cfg, backward=False) == pytest.approx(sum(flops.forward_flops(cfg).values()), rel=0.01)


@pytest.mark.parametrize("variant, inputs", [("crossmae", "masked"), ("crossmae", "unmasked"), ("cl-av", "unmasked")])
def test_train_step_matches_flop_counter(variant, inputs):
    cfg = _odd_config(variant, contrastive_inputs=inputs)
    assert _counted(cfg, backward=True) == pytest.approx(flops.train_step_flops(cfg), rel=0.01)


def test_op_counts():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 7, 8, generator=g)
    k = torch.randn(3, 2, 5, 8, generator=g)
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-2, -1)).softmax(-1) @ k
    assert counter.get_total_flops() == flops.cross_attention_flops(3, 2, 7, 5, 8)
    assert flops.cross_attention_flops(3, 2, 7, 5, 8, backward=True) == 3.5 * flops.cross_attention_flops(3, 2, 7, 5, 8)
    assert flops.cls_topk_flops(3, 2, 6, 8) == 2 * 3 * 2 * 6 * 8
    # masking: kept rows read + written, the table read once; backward adds the gradients
    assert flops.masking_bytes(2, 10, 4, 8, 2) == 2 * (2 * 4 * 8 * 2) + 10 * 8 * 2
    # restore writes every row and reads the visible ones; its backward moves the same bytes back
    assert flops.restore_bytes(2, 10, 4, 8, 2) == (2 * 4 + 10 + 2 * 10) * 8 * 2
    assert flops.restore_bytes(2, 10, 4, 8, 2, backward=True) == 2 * flops.restore_bytes(2, 10, 4, 8, 2)

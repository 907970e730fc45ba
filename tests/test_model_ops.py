"""The model gives the same losses and gradients with the fused ops (Triton) as with the references."""

from __future__ import annotations

import pytest
import torch
from kernel_marks import needs_triton

from crossmae_fast import CrossMAE, model_config

pytestmark = pytest.mark.core


@needs_triton
@pytest.mark.parametrize("variant", ["crossmae", "cl-self-mae"])
def test_kernel_model_triton_equals_reference(variant):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = CrossMAE(model_config("tiny", variant, ops="reference")).to(device)
    fused = CrossMAE(model_config("tiny", variant, ops="triton")).to(device)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    cfg = ref.cfg
    audio = torch.randn(3, cfg.audio_frames, cfg.audio_bins, generator=g).to(device)
    image = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    noise_a = torch.rand(3, cfg.num_audio_patches, generator=g).to(device)
    noise_v = torch.rand(3, cfg.num_image_patches, generator=g).to(device)
    out_ref = ref(audio, image, noise_a, noise_v)
    out_fused = fused(audio, image, noise_a, noise_v)
    for key in ("loss", "contrastive", "cross_conditioned", "cross_embedding", "self_recon"):
        if key in out_ref:
            torch.testing.assert_close(out_fused[key], out_ref[key], rtol=1e-4, atol=1e-5)
    for key in ("audio_attentive", "image_attentive", "audio_ids_restore", "image_mask"):
        if key in out_ref:
            assert torch.equal(out_fused[key], out_ref[key]), key
    out_ref["loss"].backward()
    out_fused["loss"].backward()
    fused_params = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_auto_on_cpu_is_the_reference(monkeypatch):
    """Without CUDA or the interpreter, ops='auto' runs exactly the reference ops (one CPU path per op)."""
    import importlib

    for name in ("masking", "restore", "cls_topk", "cross_attention"):
        monkeypatch.setattr(importlib.import_module(f"kernels.{name}"), "use_triton", lambda *t: False)
    g = torch.Generator().manual_seed(2)
    models, outs = [], []
    for ops in ("reference", "auto"):
        torch.manual_seed(0)
        models.append(CrossMAE(model_config("tiny", "crossmae", ops=ops)))
        cfg = models[-1].cfg
        g.manual_seed(2)
        audio = torch.randn(2, cfg.audio_frames, cfg.audio_bins, generator=g)
        image = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
        noise = (torch.rand(2, cfg.num_audio_patches, generator=g), torch.rand(2, cfg.num_image_patches, generator=g))
        outs.append(models[-1](audio, image, *noise))
        outs[-1]["loss"].backward()
    assert torch.equal(outs[0]["loss"], outs[1]["loss"])
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p.grad, q.grad), name

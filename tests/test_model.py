"""The reference CrossMAE model: shapes, variants, gradients, masking, Attentive Tokens, losses, init."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from mae_style import mae_random_masking

from crossmae_fast import CrossMAE, model_config
from crossmae_fast.config import VARIANTS
from crossmae_fast.model.losses import contrastive_loss
from crossmae_fast.model.weights import encoder_state_dict, load_mae_checkpoint

pytestmark = pytest.mark.core
ALL_TERMS = {"contrastive", "self_recon", "cross_conditioned", "cross_embedding"}


def inputs(cfg, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, cfg.audio_frames, cfg.audio_bins, generator=g)
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return audio, image


def tiny(variant: str = "crossmae", **kw) -> CrossMAE:
    torch.manual_seed(0)
    return CrossMAE(model_config("tiny", variant, ops="reference", **kw))


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_output_shapes_at_real_input_size(preset):
    """`tiny` runs for real; `base` and `large` run on the meta device (shapes only, no compute)."""
    cfg = model_config(preset, ops="reference")
    batch = 2
    if preset == "tiny":
        model = tiny()
        audio, image = inputs(cfg, batch)
    else:
        with torch.device("meta"):
            model = CrossMAE(cfg)
        model = model.to("meta")  # buffers built from numpy land on the CPU first
        audio = torch.empty(batch, cfg.audio_frames, cfg.audio_bins, device="meta")
        image = torch.empty(batch, 3, cfg.image_size, cfg.image_size, device="meta")
    with torch.no_grad():
        out = model(audio, image)
    na, nv = cfg.num_audio_patches, cfg.num_image_patches
    assert out["loss"].shape == () and out["cross_embedding"].shape == ()
    assert out["audio_mask"].shape == (batch, na) and out["image_mask"].shape == (batch, nv)
    assert out["audio_ids_keep"].shape == (batch, cfg.num_visible(na))
    assert out["image_ids_keep"].shape == (batch, cfg.num_visible(nv))
    assert out["audio_pred"].shape == (batch, na, cfg.audio_patch**2)
    assert out["image_pred"].shape == (batch, nv, 3 * cfg.image_patch**2)
    assert out["audio_attentive"].shape == (batch, cfg.num_attentive(na))
    assert out["image_attentive"].shape == (batch, cfg.num_attentive(nv))
    assert out["audio_global"].shape == out["image_global"].shape == (batch, cfg.embed_dim)
    if preset == "tiny":
        assert out["audio_mask"].sum(1).eq(na - cfg.num_visible(na)).all()
    else:
        assert (na, nv, cfg.num_visible(na), cfg.num_visible(nv)) == (512, 196, 128, 49)
        assert (cfg.num_attentive(na), cfg.num_attentive(nv)) == (32, 12)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_terms_and_gradients(variant):
    model = tiny(variant)
    audio, image = inputs(model.cfg)
    out = model(audio, image)
    terms = VARIANTS[variant]
    assert {t for t in ALL_TERMS if t in out} == set(terms)
    expected = sum((0.1 if t == "contrastive" else 1.0) * out[t] for t in terms)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{variant}: parameters without gradient: {no_grad}"
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    uses_pixels = bool(terms & {"self_recon", "cross_conditioned"})
    assert ("audio_decoder" in names) == uses_pixels
    assert ("image_to_audio" in names) == ("cross_embedding" in terms)
    cross_layer = any("cross_attn" in n and "decoder" in n for n in dict(model.named_parameters()))
    assert cross_layer == ("cross_conditioned" in terms)


@pytest.mark.parametrize("kw", [dict(attentive_tokens="zero"), dict(attentive_tokens="random"),
                                dict(queries="empty"), dict(queries="target-tokens")])
def test_ablations_run_and_train(kw):
    model = tiny("crossmae", **kw)
    out = model(*inputs(model.cfg))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if kw.get("queries") == "empty":
        assert "image_to_audio.queries" not in dict(model.named_parameters())


@pytest.mark.parametrize("kw", [dict(variant="cl-av", attentive_tokens="zero"),
                                dict(variant="self-mae", queries="empty"), dict(variant="nope"),
                                dict(preset="huge"), dict(ops="cuda"), dict(image_size=70),
                                dict(mask_ratio=1.0), dict(not_a_field=1)])
def test_invalid_config_raises(kw):
    with pytest.raises(ValueError):
        model_config(**{"preset": "tiny", **kw})


def test_masking_matches_mae():
    model = tiny()
    enc = model.image_encoder
    _, image = inputs(model.cfg)
    noise = torch.rand(image.shape[0], enc.num_patches, generator=torch.Generator().manual_seed(3))
    out = enc(image, 0.75, noise)
    tokens = enc.patch_embed(image) + enc.pos_embed[:, 1:]
    x_masked, mask, ids_restore = mae_random_masking(tokens, 0.75, noise)
    assert torch.equal(out.mask, mask) and torch.equal(out.ids_restore, ids_restore)
    # the encoder input is CLS + the MAE-masked tokens: rerun the blocks on it
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(len(image), -1, -1), x_masked], 1)
    for blk in enc.blocks:
        x = blk(x)
    torch.testing.assert_close(out.latent, enc.norm(x))


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_attentive_tokens_match_materialized_attention(modality):
    model = tiny()
    audio, image = inputs(model.cfg, batch=4, seed=3)
    enc = getattr(model, f"{modality}_encoder")
    seen = {}

    def capture(module, args):  # the first call is the masked pass; later ones are the target pass
        seen.setdefault("x", args[0])

    hook = enc.blocks[-1].register_forward_pre_hook(capture)
    out = model(audio, image)
    hook.remove()
    blk = enc.blocks[-1]
    x = blk.norm1(seen["x"])
    b, n, c = x.shape
    h = blk.attn.num_heads
    q, k, _ = blk.attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * (c // h) ** -0.5).softmax(-1)
    cls_attn = attn[:, :, 0, 1:].mean(1)
    top = cls_attn.topk(model.cfg.num_attentive(enc.num_patches), dim=1)
    gap = (top.values[:, :-1] - top.values[:, 1:]).min()
    assert gap > 1e-7, "test inputs produced a near tie"
    ids_keep = out[f"{modality}_ids_keep"]
    assert torch.equal(out[f"{modality}_attentive"], ids_keep.gather(1, top.indices))


def test_contrastive_loss_is_eq1():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    v = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    tau = 0.05
    total = 0.0
    for i in range(6):
        sa = torch.stack([torch.dot(a[i], v[j]) / tau for j in range(6)])
        sv = torch.stack([torch.dot(v[i], a[j]) / tau for j in range(6)])
        total += -(sa[i] - torch.logsumexp(sa, 0)) - (sv[i] - torch.logsumexp(sv, 0))
    torch.testing.assert_close(contrastive_loss(a, v, tau), total / 6)


def timm_vit(cfg, in_chans=3):
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=cfg.image_size, patch_size=cfg.image_patch,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, in_chans=in_chans, num_classes=0,
    )


def test_encoder_equals_timm_vit(tmp_path):
    model = tiny()
    torch.manual_seed(5)
    vit = timm_vit(model.cfg).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    load_mae_checkpoint(model, tmp_path / "vit.pth")
    vit.pos_embed.data.copy_(model.image_encoder.pos_embed)
    _, image = inputs(model.cfg)
    with torch.no_grad():
        ours = model.image_encoder(image).latent
        theirs = vit.forward_features(image)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the export loads back into timm strictly, position embedding included
    fresh = timm_vit(model.cfg)
    fresh.load_state_dict(encoder_state_dict(model, "image"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(image), theirs, rtol=1e-4, atol=1e-4)


def test_mae_checkpoint_keys_mapped_and_skips_reported(tmp_path):
    model = tiny(audio_patch=8)  # same patch size for both, so every encoder key maps
    torch.manual_seed(6)
    vit = timm_vit(model.cfg)
    state = {k: v for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 1, 32)
    state["decoder_embed.weight"] = torch.zeros(32, model.cfg.embed_dim)
    state["blocks.0.attn.unknown"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "mae.pth")
    report = load_mae_checkpoint(model, tmp_path / "mae.pth")
    encoder_keys = [k for k in model.image_encoder.state_dict()]
    assert sorted(report.loaded) == sorted([f"image_encoder.{k}" for k in encoder_keys]
                                           + [f"audio_encoder.{k}" for k in encoder_keys])
    assert not report.missing
    assert {"pos_embed", "mask_token", "decoder_embed.weight", "blocks.0.attn.unknown"} <= set(report.skipped)
    w = vit.patch_embed.proj.weight
    torch.testing.assert_close(model.audio_encoder.patch_embed.proj.weight, w.sum(1, keepdim=True))
    torch.testing.assert_close(model.image_encoder.blocks[2].mlp.fc1.weight, vit.blocks[2].mlp.fc1.weight)


def test_query_attention_maps():
    model = tiny()
    audio, image = inputs(model.cfg, batch=2)
    maps = model.query_attention(audio, image)
    cfg = model.cfg
    assert maps["image"].shape == (2, cfg.num_audio_patches, *model.image_encoder.grid)
    assert maps["audio"].shape == (2, cfg.num_image_patches, *model.audio_encoder.grid)
    # probabilities over the other modality's patch tokens
    total = maps["image"].flatten(2).sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total))
    assert tiny("cl-av").query_attention(audio, image) == {}  # no queries without cross-embedding


def test_triton_ops_refuse_to_fall_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = CrossMAE(model_config("tiny", ops="triton"))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        model(*inputs(model.cfg))


def test_unmasked_contrastive_shares_the_target_pass():
    """contrastive_inputs='unmasked': the contrastive features are the unmasked encoders' CLS (eq. 1 on
    what evaluation sees), with gradients; the Cross-Embedding targets come from the same pass, detached."""
    model = tiny("crossmae", contrastive_inputs="unmasked")
    audio, image = inputs(model.cfg, batch=4)
    out = model(audio, image)
    a, v, _ = model.eval_features(audio, image)
    torch.testing.assert_close(out["audio_global"], a)
    torch.testing.assert_close(out["contrastive"], contrastive_loss(a, v, model.cfg.temperature))
    calls = []
    hook = model.audio_encoder.register_forward_hook(lambda m, i, o: calls.append(o.mask is None))
    model(audio, image)
    hook.remove()
    assert sorted(calls) == [False, True]  # one masked and one unmasked pass, not a third for the targets
    out["contrastive"].backward()
    assert model.audio_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_unmasked_contrastive_cl_av_runs_no_masked_pass():
    model = tiny("cl-av", contrastive_inputs="unmasked")
    audio, image = inputs(model.cfg)
    out = model(audio, image)
    assert "audio_mask" not in out and set(out) >= {"contrastive", "loss", "audio_global"}
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    masked = tiny("cl-av", contrastive_inputs="masked")
    assert masked(audio, image)["audio_mask"] is not None


def test_targets_equal_between_input_modes():
    """The Cross-Embedding term does not depend on where the contrastive features come from."""
    audio, image = inputs(model_config("tiny"), batch=2)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    outs = [tiny("crossmae", contrastive_inputs=m)(audio, image, noise, noise) for m in ("masked", "unmasked")]
    torch.testing.assert_close(outs[0]["cross_embedding"], outs[1]["cross_embedding"])
    torch.testing.assert_close(outs[0]["cross_conditioned"], outs[1]["cross_conditioned"])
    # the shared pass's targets are detached: the term's encoder gradients are those of the masked pass
    grads = []
    for mode in ("masked", "unmasked"):
        model = tiny("crossmae", contrastive_inputs=mode)
        model(audio, image, noise, noise)["cross_embedding"].backward()
        grads.append(model.audio_encoder.blocks[0].attn.qkv.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kw", [dict(contrastive_inputs="both"), dict(temperature=0.0),
                                dict(contrastive_weight=-1.0)])
def test_invalid_contrastive_options(kw):
    with pytest.raises(ValueError):
        model_config("tiny", **kw)

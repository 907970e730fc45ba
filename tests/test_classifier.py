"""The fine-tuning classifier: modes, pooling, linear probe, missing modality, initialisation sources,
position-embedding resizing and layer-wise lr decay groups."""

import pytest
import torch

from crossmae_fast.config import model_config
from crossmae_fast.model.classifier import Classifier, layer_id, param_groups, resize_pos_embed
from crossmae_fast.model.classifier_init import InitError, init_classifier
from crossmae_fast.model.crossmae import CrossMAE
from crossmae_fast.model.pos_embed import sincos_2d
from crossmae_fast.model.weights import encoder_state_dict

pytestmark = pytest.mark.core


def cfg(**kw):
    return model_config("tiny", ops="reference", **kw)


def batch(c, n=4):
    torch.manual_seed(0)
    return torch.randn(n, c.audio_frames, c.audio_bins), torch.randn(n, 3, c.image_size, c.image_size)


@pytest.mark.parametrize("mode", ["av", "audio", "visual"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_modes_and_pools(mode, pool):
    c = cfg()
    m = Classifier(c, 5, mode=mode, pool=pool, drop_path_rate=0.1)
    a, v = batch(c)
    out = m(a if mode != "visual" else None, v if mode != "audio" else None)
    assert out.shape == (4, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_linear_probe_freezes_encoders_and_normalises():
    c = cfg()
    m = Classifier(c, 3, linear_probe=True)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    m.train()
    assert not m.audio_encoder.training and m.head_norm.training
    assert isinstance(m.head_norm, torch.nn.BatchNorm1d) and not m.head_norm.affine


def test_missing_modality_removes_its_contribution():
    c = cfg()
    m = Classifier(c, 3).eval()
    a, v = batch(c)
    with torch.no_grad():
        full_v = m.features(a, v)[:, c.embed_dim:]
        expected = full_v @ m.head.weight[:, c.embed_dim:].T + m.head.bias
        torch.testing.assert_close(m(None, v, missing="audio"), expected)
    with pytest.raises(ValueError):
        Classifier(c, 3, mode="audio")(a, None, missing="visual")


def test_init_from_pretraining_checkpoint_and_exports(tmp_path):
    c = cfg()
    torch.manual_seed(1)
    pre = CrossMAE(c)
    ckpt = {"model": pre.state_dict(), "config": {"model": c.to_dict()}, "step": 1}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    m = Classifier(c, 4)
    report = init_classifier(m, [tmp_path / "checkpoint.pt"])
    assert report.missing == [] and any("decoder" in k for k in report.unused)
    torch.testing.assert_close(m.audio_encoder.blocks[0].attn.qkv.weight, pre.audio_encoder.blocks[0].attn.qkv.weight)
    for modality in ("audio", "image"):
        torch.save(encoder_state_dict(pre, modality), tmp_path / f"encoder_{modality}.pth")
    m2 = Classifier(c, 4)
    init_classifier(m2, [tmp_path / "encoder_audio.pth", tmp_path / "encoder_image.pth"])
    for k, v in m.state_dict().items():
        if not k.startswith("head"):
            torch.testing.assert_close(m2.state_dict()[k], v, msg=k)


def test_init_rejects_what_does_not_fit(tmp_path):
    c = cfg()
    torch.save({"model": CrossMAE(cfg(depth=2)).state_dict(), "config": {"model": cfg(depth=2).to_dict()}},
               tmp_path / "shallow.pt")
    with pytest.raises(InitError, match="missing audio_encoder.blocks.2"):
        init_classifier(Classifier(c, 4), [tmp_path / "shallow.pt"])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(InitError, match="not a checkpoint"):
        init_classifier(Classifier(c, 4), [tmp_path / "junk.pt"])


def test_imagenet_mae_init_sums_rgb(tmp_path):
    c = cfg(image_patch=16)  # one patch size for both, as an ImageNet ViT-B/16 for the base preset
    vit = {k: v for k, v in CrossMAE(c).image_encoder.state_dict().items()}
    vit["pos_embed"] = sincos_2d(c.embed_dim, (4, 4), cls_token=True)[None]
    vit["decoder_embed.weight"] = torch.zeros(2, 2)
    torch.save({"model": vit}, tmp_path / "mae.pth")
    m = Classifier(c, 4)
    init_classifier(m, [tmp_path / "mae.pth"])
    torch.testing.assert_close(m.audio_encoder.patch_embed.proj.weight,
                               vit["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_shorter_audio_resizes_position_embeddings(tmp_path):
    c = cfg()
    torch.save({"model": CrossMAE(c).state_dict(), "config": {"model": c.to_dict()}}, tmp_path / "ck.pt")
    short = cfg(audio_frames=128)  # half the clip: 8 x 4 patches instead of 16 x 4
    m = Classifier(short, 4, mode="audio")
    init_classifier(m, [tmp_path / "ck.pt"])
    expected = resize_pos_embed(sincos_2d(c.embed_dim, c.audio_grid, cls_token=True)[None], c.audio_grid, (8, 4))
    torch.testing.assert_close(m.audio_encoder.pos_embed, expected)
    assert m(torch.randn(2, 128, c.audio_bins), None).shape == (2, 4)


def test_resize_pos_embed_identity_and_shape():
    pos = sincos_2d(16, (4, 4), cls_token=True)[None]
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos
    out = resize_pos_embed(pos, (4, 4), (8, 8))
    assert out.shape == (1, 65, 16) and torch.equal(out[:, 0], pos[:, 0])


def test_layer_decay_groups():
    c = cfg()
    m = Classifier(c, 4)
    assert layer_id("audio_encoder.cls_token", 4) == 0 and layer_id("image_encoder.blocks.2.mlp.fc1.weight", 4) == 3
    groups = param_groups(m, 0.05, layer_decay=0.5, head_lr_scale=10.0)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert scale[id(named["head.weight"])] == (10.0, 0.05)
    assert scale[id(named["audio_encoder.blocks.0.attn.qkv.weight"])] == (0.5 ** 4, 0.05)
    assert scale[id(named["audio_encoder.cls_token"])] == (0.5 ** 5, 0.0)
    assert scale[id(named["image_encoder.norm.weight"])] == (1.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_classify_step_capture_replays_the_eager_step():
    """ClassifyStep on TrainStep's capture machinery (the CUDA-graph capture injected, as on a GPU):
    replayed steps with per-group learning rates give the eager run's losses and weights."""
    from types import SimpleNamespace

    from crossmae_fast.classify.step import ClassifyStep

    def make(capture=None):
        torch.manual_seed(0)
        m = Classifier(cfg(depth=1), 4, drop_path_rate=0.0)
        opt = torch.optim.AdamW(param_groups(m, 0.05, layer_decay=0.5, head_lr_scale=10.0), lr=1e-3)
        return m, ClassifyStep(m, opt, "bce", torch.device("cpu"), cuda_graph=True, warmup=1, capture=capture)

    m, step = make(lambda fn: SimpleNamespace(replay=fn))
    ref_m, ref = make()
    ref.want_graph = False
    c = m.cfg
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        a, v = torch.randn(2, c.audio_frames, c.audio_bins, generator=g), torch.randn(2, 3, 64, 64, generator=g)
        t = (torch.rand(2, 4, generator=g) > 0.5).float()
        for s in (step, ref):
            s.set_lr(1e-3 * (i + 1))
            s(a, v, t)
        assert step.read() == ref.read()
    assert step.mode == "cuda-graph"
    assert [g["lr"] for g in step.opt.param_groups] == [4e-3 * g["lr_scale"] for g in step.opt.param_groups]
    for (k, p), q in zip(m.state_dict().items(), ref_m.state_dict().values()):
        assert torch.equal(p, q), k

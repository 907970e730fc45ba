"""`kernels.patch_mae`: an MAE model (facebookresearch/mae's methods, tests/mae_style.py) patched in one
call gives the same masks, loss and gradients as unpatched under the same torch seed, through the
fused ops (Triton: CUDA or the interpreter; references on plain CPU), eager and compiled."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from kernel_marks import DEVICE, needs_cuda, needs_triton
from mae_style import PRESETS, MAEViT
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels.mae_patch import patched_methods

pytestmark = pytest.mark.core
FUSED = {"crossmae::masking_gather", "crossmae::restore_tokens"}
FUSED_BACKWARD = {"crossmae::masking_gather_backward", "crossmae::restore_tokens_backward"}
CASES = {  # how the position embeddings are held -> (batch, image size: odd patch grids)
    "fixed": (3, (20, 28)),  # MAE's: batch-shared, frozen sin-cos
    "learned": (5, (12, 36)),  # batch-shared, learnable
    "per-sample": (3, (28, 20)),  # [B, 1 + L, D], learnable
}


class OpLog(TorchDispatchMode):
    """Names of the ops dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def make(pos: str, device=DEVICE) -> tuple[MAEViT, torch.Tensor]:
    """A tiny MAE and an image batch for case `pos` (see CASES)."""
    batch, size = CASES[pos]
    torch.manual_seed(0)
    model = MAEViT(replace(PRESETS["tiny"], img_size=size)).to(device)
    if pos != "fixed":
        rows = batch if pos == "per-sample" else 1
        for name in ("pos_embed", "decoder_pos_embed"):
            shape = getattr(model, name).shape[1:]
            setattr(model, name, nn.Parameter(torch.randn(rows, *shape, device=device)))
    return model, torch.randn(batch, 3, *size, device=device)


def step(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 7):
    """(loss, pred, mask, {parameter: grad}) of one forward + backward under torch seed `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, pred, mask = model(imgs, mask_ratio)
    loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # a compiled model's are its module's
    grads = {n: p.grad for n, p in params if p.requires_grad}
    return loss.detach(), pred.detach(), mask, grads


def assert_same(ours, mae, rtol: float = 1e-6) -> None:
    """Equal masks; loss, predictions and every gradient equal to `rtol` of each tensor's largest value
    (gradients summed over the batch may differ in summation order only)."""
    (loss, pred, mask, grads), (loss_ref, pred_ref, mask_ref, grads_ref) = ours, mae
    assert torch.equal(mask, mask_ref) and mask.dtype == mask_ref.dtype
    assert grads.keys() == grads_ref.keys()
    for name, a, b in [("loss", loss, loss_ref), ("pred", pred, pred_ref)] + [(n, grads[n], g) for n, g in
                                                                             grads_ref.items()]:
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)


@needs_triton
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("pos", list(CASES))
def test_kernel_mae_patch_equals_mae(pos, mask_ratio):
    model, imgs = make(pos)
    patched = kernels.patch_mae(copy.deepcopy(model))
    assert set(patched_methods(patched)) == {"random_masking", "forward_encoder", "forward_decoder"}
    mae = step(model, imgs, mask_ratio)
    with OpLog() as log:
        ours = step(patched, imgs, mask_ratio)
    assert FUSED | FUSED_BACKWARD <= log.names  # the Triton ops ran, forward and backward
    assert_same(ours, mae)
    assert ("pos_embed" in mae[3]) == (pos != "fixed")
    # the encoder alone: same ids_restore and latent
    torch.manual_seed(3)
    latent_ref, _, ids_ref = model.forward_encoder(imgs, mask_ratio)
    torch.manual_seed(3)
    latent, _, ids = patched.forward_encoder(imgs, mask_ratio)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(latent, latent_ref, rtol=1e-6, atol=1e-6)


@needs_triton
def test_kernel_mae_patch_random_masking_returns_maes_triple():
    model, _ = make("fixed")
    patched = kernels.patch_mae(copy.deepcopy(model))
    x = torch.randn(5, 35, 32, device=DEVICE)
    torch.manual_seed(11)
    ref = model.random_masking(x, 0.75)
    torch.manual_seed(11)
    with OpLog() as log:
        out = patched.random_masking(x, 0.75)
    assert "crossmae::masking_gather" in log.names
    assert len(out) == 3 and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(out, ref, strict=True))
    after = torch.rand(4, device=DEVICE)  # the generator moved on by MAE's draw exactly
    torch.manual_seed(11)
    torch.rand(5, 35, device=DEVICE)
    assert torch.equal(after, torch.rand(4, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cpu", reason="the reference path is the CPU's")
def test_kernel_mae_patch_cpu_references(monkeypatch):
    """Plain CPU tensors (no interpreter) run the references: still MAE's results."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, imgs = make("learned")
    patched = kernels.patch_mae(copy.deepcopy(model))
    mae = step(model, imgs, 0.75)
    with OpLog() as log:
        ours = step(patched, imgs, 0.75)
    assert not log.names & (FUSED | FUSED_BACKWARD)
    assert_same(ours, mae)


def test_kernel_mae_patch_names_what_is_missing():
    model, _ = make("fixed")
    del model.mask_token, model.decoder_pos_embed
    with pytest.raises(ValueError, match="missing mask_token, decoder_pos_embed") as err:
        kernels.patch_mae(model)
    assert "restore=False" in str(err.value)
    assert patched_methods(model) == () and not {"forward_encoder", "random_masking"} & set(vars(model))
    kernels.patch_mae(model, restore=False)  # the encoder half has all it needs
    assert patched_methods(model) == ("random_masking", "forward_encoder")
    with pytest.raises(ValueError, match=r"missing patch_embed, .*decoder_pred, random_masking\(\)"):
        kernels.patch_mae(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nothing to patch"):
        kernels.patch_mae(model, masking=False, restore=False)


def test_kernel_mae_patch_rejects_methods_that_are_not_maes():
    class TwoDMasking(MAEViT):  # an AudioMAE-style encoder with an extra masking mode
        def forward_encoder(self, x, mask_ratio, mask_2d=False):
            return super().forward_encoder(x, mask_ratio)

    model = TwoDMasking(PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"forward_encoder\(x, mask_ratio, mask_2d\) is not MAE's"):
        kernels.patch_mae(model)
    assert patched_methods(model) == ()
    assert patched_methods(kernels.patch_mae(model, masking=False)) == ("forward_decoder",)


@needs_triton
def test_kernel_mae_patch_unpatch_restores():
    model, imgs = make("learned")
    own = model.random_masking  # an instance-level attribute that must come back as it was
    model.random_masking = own
    assert kernels.unpatch_mae(model) is model  # not patched: unchanged
    mae = step(model, imgs, 0.75)
    assert kernels.patch_mae(model) is model
    clone = copy.deepcopy(model)  # a copy stays patched, bound to itself
    assert clone.forward_decoder.__self__ is clone and patched_methods(clone) == patched_methods(model)
    kernels.patch_mae(model, masking=False)  # re-patching starts from the originals
    assert patched_methods(model) == ("forward_decoder",) and vars(model)["random_masking"] is own
    kernels.unpatch_mae(model)
    assert patched_methods(model) == () and "forward_decoder" not in vars(model)
    assert vars(model)["random_masking"] is own and model.forward_encoder.__func__ is MAEViT.forward_encoder
    with OpLog() as log:
        again = step(model, imgs, 0.75)
    assert not log.names & FUSED
    for a, b in zip(again[:3], mae[:3], strict=True):
        assert torch.equal(a, b)


@needs_triton
def test_kernel_mae_patch_torch_compile():
    """Compiled (fullgraph, AOTAutograd) patched model against eager MAE, same seed."""
    model, imgs = make("per-sample")
    patched = kernels.patch_mae(copy.deepcopy(model))
    traced: set[str] = set()

    def record(gm, _):  # the ops of the forward and backward graphs
        traced.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(patched, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    try:
        mae = step(model, imgs, 0.75)
        ours = step(compiled, imgs, 0.75)
    finally:
        torch._dynamo.reset()
    assert {f"{op.replace('::', '.')}.default" for op in FUSED | FUSED_BACKWARD} <= traced
    assert_same(ours, mae)


@needs_cuda
@pytest.mark.parametrize("pos", ["fixed", "per-sample"])
def test_kernel_mae_patch_bf16_autocast(pos):
    """CUDA, bf16 autocast as MAE trains: the same dtypes and masks, values to bf16 accuracy."""
    model, imgs = make(pos)
    patched = kernels.patch_mae(copy.deepcopy(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mae = step(model, imgs, 0.75)
        ours = step(patched, imgs, 0.75)
    assert_same(ours, mae, rtol=2e-2)

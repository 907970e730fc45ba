"""`patch_mae(model)`: one call puts the fused masking and restore ops into an MAE-family model.

The model is recognised by facebookresearch/mae's `MaskedAutoencoderViT` attribute names and method
signatures (AudioMAE's and other forks' share them). One instance is patched in place: the new
methods are bound on the instance, whose own attributes (if any) are kept so `unpatch_mae` can put
them back; the class and every other instance are untouched.

The patched methods do what MAE's do, in the same order, with the same random numbers: the noise is
`torch.rand(N, L, device=x.device)`, drawn at the point where MAE draws it, so under the same torch
seed the patched model picks the same masks and computes the same loss and gradients.
"""

from __future__ import annotations

import inspect
import types

import torch

from kernels.masking import random_masking as fused_random_masking
from kernels.restore import restore_tokens

ENCODER_ATTRS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")
DECODER_ATTRS = ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred")
METHOD_ARGS = {"random_masking": "x, mask_ratio", "forward_encoder": "imgs, mask_ratio",
               "forward_decoder": "x, ids_restore"}
_STATE = "_mae_patch_originals"  # method name -> the instance's own attribute before patching, or _NONE
_NONE = object()


def _random_masking(self, x: torch.Tensor, mask_ratio: float):
    """MAE's `random_masking` with the fused gather: (x_masked, mask, ids_restore)."""
    noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
    x_masked, mask, ids_restore, _ = fused_random_masking(x, mask_ratio, noise=noise)
    return x_masked, mask, ids_restore


def _forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
    """MAE's `forward_encoder`; the patch tokens get `pos_embed[:, 1:]` inside the masking gather."""
    x = self.patch_embed(imgs)
    noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
    x, mask, ids_restore, _ = fused_random_masking(x, mask_ratio, self.pos_embed[:, 1:, :], noise)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in self.blocks:
        x = blk(x)
    return self.norm(x), mask, ids_restore


def _forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor):
    """MAE's `forward_decoder`; mask tokens, un-shuffle and `decoder_pos_embed[:, 1:]` in one op."""
    x = self.decoder_embed(x)
    pos = self.decoder_pos_embed
    tokens = restore_tokens(x[:, 1:, :], self.mask_token, ids_restore, pos[:, 1:, :])
    x = torch.cat((x[:, :1, :] + pos[:, :1, :], tokens), dim=1)
    for blk in self.decoder_blocks:
        x = blk(x)
    x = self.decoder_pred(self.decoder_norm(x))
    return x[:, 1:, :]


_PATCHES = {"random_masking": _random_masking, "forward_encoder": _forward_encoder,
            "forward_decoder": _forward_decoder}


def _signature_problem(model: object, name: str) -> str | None:
    """Why `model.<name>` is not MAE's method, or None. Two named parameters, as MAE's, are required."""
    try:
        params = inspect.signature(getattr(model, name)).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read, assume MAE's
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = [p.name for p in params if p.kind not in variadic]
    if len(named) == 2 or (len(named) < 2 and any(p.kind in variadic for p in params)):
        return None
    return f"{name}({', '.join(named)}) is not MAE's {name}({METHOD_ARGS[name]})"


def patch_mae(model, *, masking: bool = True, restore: bool = True):
    """Run `model`'s masking (`random_masking`, `forward_encoder`) and decoder restore
    (`forward_decoder`) through the fused ops; returns `model`, patched in place.

    `model` needs facebookresearch/mae's `MaskedAutoencoderViT` attributes: for `masking`
    `patch_embed, cls_token, pos_embed, blocks, norm` and the methods `random_masking(x, mask_ratio)`,
    `forward_encoder(imgs, mask_ratio)`; for `restore` `decoder_embed, mask_token, decoder_pos_embed,
    decoder_blocks, decoder_norm, decoder_pred` and `forward_decoder(x, ids_restore)`. Anything
    missing raises one ValueError naming all of it, and nothing is patched. Patching a patched model
    first restores its original methods. Undo with `unpatch_mae(model)`.
    """
    if not (masking or restore):
        raise ValueError("patch_mae: masking=False and restore=False leave nothing to patch")
    names = (["random_masking", "forward_encoder"] if masking else []) + (["forward_decoder"] if restore else [])
    attrs = (ENCODER_ATTRS if masking else ()) + (DECODER_ATTRS if restore else ())
    missing = [a for a in attrs if getattr(model, a, None) is None]
    missing += [f"{n}()" for n in names if not callable(getattr(model, n, None))]
    problems = [p for n in names if f"{n}()" not in missing and (p := _signature_problem(model, n))]
    if missing or problems:
        what = "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + problems)
        hint = " (masking=False / restore=False patch only the other half)" if masking and restore else ""
        raise ValueError(f"patch_mae: {type(model).__name__} is not an MAE-layout model: {what}{hint}")
    unpatch_mae(model)
    own = vars(model)
    own[_STATE] = {n: own.get(n, _NONE) for n in names}
    for n in names:
        own[n] = types.MethodType(_PATCHES[n], model)
    return model


def unpatch_mae(model):
    """Put back the methods `patch_mae` replaced; returns `model` (unchanged if it was not patched)."""
    own = vars(model)
    for name, original in own.pop(_STATE, {}).items():
        if original is _NONE:
            own.pop(name, None)
        else:
            own[name] = original
    return model


def patched_methods(model) -> tuple[str, ...]:
    """The method names `patch_mae` replaced on `model` (empty when it is not patched)."""
    return tuple(vars(model).get(_STATE, ()))

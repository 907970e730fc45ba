"""FLOP counts derived from a `ModelConfig`'s shapes (multiply-add = 2 FLOPs; matrix products only).

Per sample. Element-wise work (norms, softmax, GELU, losses) is left out: it is well under 1% of a
step. A train step is 3 x the forward of the trained parts (backward = 2 x forward) plus the
forward-only target pass of the Cross-Embedding loss (docs/design.md section 7: ViT-B CrossMAE ~420 GFLOP;
these functions give 31.5 G encoders, 41.6 G cross-conditioned, 25.1 G cross-embedding, 132 G target,
426 G per step).
"""

from __future__ import annotations

from crossmae_fast.config import ModelConfig


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def attention(lq: int, lk: int, dim: int) -> int:
    """Q K^T and P V over all heads (`dim` = heads x head dim)."""
    return 4 * lq * lk * dim


def block(tokens: int, dim: int, mlp_ratio: float) -> int:
    """Pre-norm transformer block: qkv, attention, projection, two-layer MLP."""
    hidden = int(dim * mlp_ratio)
    return (linear(tokens, dim, 3 * dim) + attention(tokens, tokens, dim) + linear(tokens, dim, dim)
            + linear(tokens, dim, hidden) + linear(tokens, hidden, dim))


def _modalities(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Per modality: (patches, pixels per patch)."""
    return {
        "audio": (cfg.num_audio_patches, cfg.audio_patch**2),
        "image": (cfg.num_image_patches, 3 * cfg.image_patch**2),
    }


def encoder(cfg: ModelConfig, patches: int, pixels: int, masked: bool) -> int:
    """Patch embedding of every patch, then the blocks on CLS + visible (or all) tokens."""
    tokens = 1 + (cfg.num_visible(patches) if masked else patches)
    cls_topk = 2 * tokens * cfg.embed_dim if masked else 0  # CLS query against every key
    return linear(patches, pixels, cfg.embed_dim) + cfg.depth * block(tokens, cfg.embed_dim, cfg.mlp_ratio) + cls_topk


def recon_decoder(cfg: ModelConfig, patches: int, pixels: int, cond_visible: int | None, attentive: int) -> int:
    """MAE decoder on CLS + all patches; with `cond_visible` the Cross-Conditioned layer first: queries
    are the visible patch tokens, its K/V projection runs on all of the other modality's visible
    tokens, attention on `attentive` of them."""
    d, dd = cfg.embed_dim, cfg.decoder_dim
    vis = cfg.num_visible(patches)
    flops = linear(1 + vis, d, dd)
    if cond_visible is not None:
        flops += (2 * linear(vis, dd, dd) + linear(cond_visible, d, 2 * dd) + attention(vis, attentive, dd))
    flops += cfg.decoder_depth * block(1 + patches, dd, cfg.mlp_ratio)
    return flops + linear(1 + patches, dd, pixels)


def embedding_decoder(cfg: ModelConfig, src_patches: int, tgt_patches: int) -> int:
    """Cross-Embedding decoder: `tgt_patches` queries attend to the source's visible patch tokens."""
    d, dd = cfg.embed_dim, cfg.decoder_dim
    mem, q = cfg.num_visible(src_patches), tgt_patches
    per_block = (block(q, dd, cfg.mlp_ratio) + 2 * linear(q, dd, dd) + linear(mem, dd, 2 * dd)
                 + attention(q, mem, dd))
    queries = linear(cfg.num_visible(tgt_patches), d, dd) if cfg.queries == "target-tokens" else 0
    return linear(mem, d, dd) + queries + cfg.emb_decoder_depth * per_block + linear(q, dd, d)


def forward_flops(cfg: ModelConfig) -> dict[str, int]:
    """Per-sample forward FLOPs by part: `encoders` (masked, both), the decoders of the variant's
    terms (`cross_conditioned` / `self_recon`, `cross_embedding`) and the unmasked pass: the no-grad
    `target` pass, or with `contrastive_inputs="unmasked"` the trained `unmasked_encoders` that also
    give the targets (then a contrastive-only variant runs no masked pass)."""
    mods = _modalities(cfg)
    (la, pa), (lv, pv) = mods["audio"], mods["image"]
    terms = cfg.terms
    unmasked = cfg.contrastive_inputs == "unmasked" and "contrastive" in terms
    parts = {}
    if not unmasked or terms - {"contrastive"}:
        parts["encoders"] = encoder(cfg, la, pa, True) + encoder(cfg, lv, pv, True)
    if unmasked:
        parts["unmasked_encoders"] = encoder(cfg, la, pa, False) + encoder(cfg, lv, pv, False)
    if "cross_conditioned" in terms or "self_recon" in terms:
        cond = "cross_conditioned" in terms
        va, vv = cfg.num_visible(la), cfg.num_visible(lv)
        parts["cross_conditioned" if cond else "self_recon"] = (
            recon_decoder(cfg, la, pa, vv if cond else None, cfg.num_attentive(lv))
            + recon_decoder(cfg, lv, pv, va if cond else None, cfg.num_attentive(la))
        )
    if "cross_embedding" in terms:
        parts["cross_embedding"] = embedding_decoder(cfg, lv, la) + embedding_decoder(cfg, la, lv)
        if not unmasked:
            parts["target"] = encoder(cfg, la, pa, False) + encoder(cfg, lv, pv, False)
    return parts


def train_step_flops(cfg: ModelConfig) -> int:
    """Per-sample FLOPs of one optimisation step: 3 x trained forward + the target pass, less the
    patch embeddings' input gradients (the inputs need none) of each trained encoder pass."""
    parts = forward_flops(cfg)
    target = parts.pop("target", 0)
    passes = ("encoders" in parts) + ("unmasked_encoders" in parts)
    patch_grad = sum(linear(n, pixels, cfg.embed_dim) for n, pixels in _modalities(cfg).values())
    return 3 * sum(parts.values()) - passes * patch_grad + target


# --- the fused ops ------------------------------------------------------------------------------


def cross_attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int, backward: bool = False) -> int:
    """Forward 4 B H Lq Lk D; the flash-style backward does 2.5x that (five products, not two)."""
    fwd = batch * attention(lq, lk, heads * head_dim)
    return int(fwd * 3.5) if backward else fwd


def cls_topk_flops(batch: int, heads: int, keys: int, head_dim: int) -> int:
    """The CLS query's dot product with every key."""
    return 2 * batch * heads * keys * head_dim


def masking_bytes(batch: int, patches: int, keep: int, dim: int, itemsize: int, backward: bool = False) -> int:
    """Least traffic of masking (+ position embedding): read kept rows and the table, write them;
    the backward reads their gradient and writes the full-size input gradient (zeros included)."""
    rows = batch * keep * dim * itemsize
    table = patches * dim * itemsize
    fwd = 2 * rows + table
    return fwd + rows + batch * patches * dim * itemsize + table if backward else fwd


def restore_bytes(batch: int, patches: int, keep: int, dim: int, itemsize: int, backward: bool = False) -> int:
    """Least traffic of restore (+ position embedding): read the visible rows and the table, write
    every row; the backward reads every row's gradient and writes the visible rows' and the table's."""
    full = batch * patches * dim * itemsize
    vis = batch * keep * dim * itemsize
    table = patches * dim * itemsize
    fwd = vis + table + full
    return fwd + full + vis + table if backward else fwd


def cls_topk_bytes(batch: int, heads: int, keys: int, head_dim: int, itemsize: int) -> int:
    """Read the keys and the CLS query; the outputs are negligible."""
    return batch * heads * (keys + 1) * head_dim * itemsize

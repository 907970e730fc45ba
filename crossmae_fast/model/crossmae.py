"""CrossMAE: two ViT encoders, Cross-Conditioned and Cross-Embedding decoders, contrastive alignment.

Parameter names inside each encoder follow timm's VisionTransformer (`patch_embed.proj`,
`cls_token`, `blocks.N.attn.qkv`, `norm`, ...), so ImageNet MAE / timm weights load directly.
The four token-level ops (masking, restore, CLS-attention top-k, cross-attention) come from
`kernels` or from their pure-torch references, picked by `ModelConfig.ops`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed

import kernels
from crossmae_fast.config import ModelConfig
from crossmae_fast.model import losses
from crossmae_fast.model.pos_embed import sincos_2d
from kernels import reference
from kernels.utils import use_triton


def norm_layer(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def resolve_ops(name: str) -> SimpleNamespace:
    """`reference`: pure torch everywhere. `triton` / `auto`: the fused ops, which run Triton on
    CUDA tensors (and on CPU under TRITON_INTERPRET=1) and their references on CPU otherwise."""
    if name == "reference":
        return SimpleNamespace(**{op: getattr(reference, f"{op}_reference") for op in kernels.OPS})
    return SimpleNamespace(**{op: getattr(kernels, op) for op in kernels.OPS})


def mae_init_(m: nn.Module) -> None:
    """MAE's initialisation of one module (use with `model.apply`): Xavier-uniform linear weights, zero
    biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head self-attention (timm names). Can also hand back the CLS query and all keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_qk: bool = False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        out = self.proj(out)
        return (out, (q[:, :, 0], k)) if return_qk else out


class Block(nn.Module):
    """Pre-norm transformer block, parameter-compatible with timm's `Block`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_qk: bool = False):
        if return_qk:
            y, qk = self.attn(self.norm1(x), return_qk=True)
            x = x + y
            return x + self.mlp(self.norm2(x)), qk
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """Multi-head attention from queries `x` to a memory `y`, optionally through row indices of `y`."""

    def __init__(self, dim: int, num_heads: int, ops: SimpleNamespace, kv_dim: int | None = None):
        super().__init__()
        self.num_heads, self.ops = num_heads, ops
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, kv_index: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(y).reshape(b, y.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = self.ops.cross_attention(q, k, v, kv_index)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, Lq, Ly] attention probabilities averaged over heads (for pictures, not training)."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k = self.kv(y)[..., :c].reshape(b, y.shape[1], h, c // h).transpose(1, 2)
        return (q @ k.transpose(-2, -1) * (c // h) ** -0.5).softmax(-1).mean(1)


class Encoded(NamedTuple):
    latent: torch.Tensor  # [B, 1 + visible, D] after the final norm, CLS first
    mask: torch.Tensor | None  # [B, L], 1 = removed
    ids_restore: torch.Tensor | None  # [B, L]
    ids_keep: torch.Tensor | None  # [B, visible]
    cls_qk: tuple[torch.Tensor, torch.Tensor] | None  # last block's CLS query [B,H,d] and keys [B,H,1+N,d]


class Encoder(nn.Module):
    """ViT encoder with CLS token and fixed sin-cos position embeddings; masks MAE-style."""

    def __init__(self, cfg: ModelConfig, in_chans: int, size: tuple[int, int], patch: int, ops: SimpleNamespace):
        super().__init__()
        self.ops, self.patch = ops, patch
        self.grid = (size[0] // patch, size[1] // patch)
        self.patch_embed = PatchEmbed(size, patch, in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", sincos_2d(cfg.embed_dim, self.grid, cls_token=True)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = norm_layer(cfg.embed_dim)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None) -> Encoded:
        """Encode all patches (`mask_ratio=0`) or a random visible subset."""
        x = self.patch_embed(x)
        mask = ids_restore = ids_keep = None
        if mask_ratio > 0:
            x, mask, ids_restore, ids_keep = self.ops.random_masking(x, mask_ratio, self.pos_embed[:, 1:], noise)
        else:
            x = x + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks[:-1]:
            x = blk(x)
        x, cls_qk = self.blocks[-1](x, return_qk=True)
        return Encoded(self.norm(x), mask, ids_restore, ids_keep, cls_qk)


class ReconDecoder(nn.Module):
    """MAE decoder to patch pixels; with `cond_dim` it first cross-attends (one pre-norm layer) to
    the other modality's Attentive Tokens: the Cross-Conditioned decoder."""

    def __init__(self, cfg: ModelConfig, enc_dim: int, grid: tuple[int, int], patch_pixels: int,
                 ops: SimpleNamespace, cond_dim: int | None = None):
        super().__init__()
        dim, self.ops = cfg.decoder_dim, ops
        self.embed = nn.Linear(enc_dim, dim)
        if cond_dim is not None:
            self.cross_norm = norm_layer(dim)
            self.cross_attn = CrossAttention(dim, cfg.decoder_heads, ops, kv_dim=cond_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid, cls_token=True)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.norm = norm_layer(dim)
        self.pred = nn.Linear(dim, patch_pixels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, cond: torch.Tensor | None = None,
                cond_index: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, patch_pixels] predictions in the original patch order."""
        x = self.embed(latent)
        cls, tokens = x[:, :1], x[:, 1:]
        if cond is not None:  # queries: the visible patch tokens, not CLS
            tokens = tokens + self.cross_attn(self.cross_norm(tokens), cond, cond_index)
        tokens = self.ops.restore_tokens(tokens, self.mask_token, ids_restore, self.pos_embed[:, 1:])
        x = torch.cat([cls + self.pos_embed[:, :1], tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]


class EmbeddingBlock(nn.Module):
    """Self-attention over the queries, cross-attention to the other modality, MLP (all pre-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ops: SimpleNamespace):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.cross_attn = CrossAttention(dim, num_heads, ops)
        self.norm3 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class EmbeddingDecoder(nn.Module):
    """Cross-Embedding decoder X -> Y: one query per Y patch attends to X's visible patch tokens and
    predicts Y's encoder features. Queries are learnable, empty (zero, frozen) or Y's own visible
    encoder tokens put back on Y's grid with a mask token where Y was masked (`target-tokens`)."""

    def __init__(self, cfg: ModelConfig, src_dim: int, tgt_dim: int, tgt_grid: tuple[int, int],
                 ops: SimpleNamespace):
        super().__init__()
        dim, self.mode = cfg.decoder_dim, cfg.queries
        num_queries = tgt_grid[0] * tgt_grid[1]
        self.embed = nn.Linear(src_dim, dim)
        if self.mode == "learnable":
            self.queries = nn.Parameter(torch.zeros(1, num_queries, dim))
        elif self.mode == "empty":
            self.register_buffer("queries", torch.zeros(1, num_queries, dim), persistent=False)
        else:
            self.query_embed = nn.Linear(tgt_dim, dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.ops = ops
        self.register_buffer("pos_embed", sincos_2d(dim, tgt_grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            EmbeddingBlock(dim, cfg.decoder_heads, cfg.mlp_ratio, ops) for _ in range(cfg.emb_decoder_depth)
        )
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, tgt_dim)

    def forward(self, latent: torch.Tensor, tgt: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_attention: bool = False) -> torch.Tensor:
        """[B, num_queries, tgt_dim] predicted target features, or with `return_attention` the last
        block's query-to-memory attention [B, num_queries, X's visible patches] (Fig. 3b, 3c).
        `tgt` = (Y's visible encoder tokens without CLS, Y's ids_restore), for `target-tokens` only."""
        memory = self.embed(latent[:, 1:])
        if self.mode == "target-tokens":
            x = self.ops.restore_tokens(self.query_embed(tgt[0]), self.mask_token, tgt[1])
        else:
            x = self.queries.expand(latent.shape[0], -1, -1)
        x = x + self.pos_embed
        for blk in self.blocks[:-1]:
            x = blk(x, memory)
        if return_attention:
            x = x + self.blocks[-1].attn(self.blocks[-1].norm1(x))
            return self.blocks[-1].cross_attn.weights(self.blocks[-1].norm2(x), memory)
        return self.head(self.norm(self.blocks[-1](x, memory)))


class CrossMAE(nn.Module):
    """CrossMAE and its Table 2 variants. `forward(audio [B,T,F], image [B,3,H,W])` returns a dict
    with `loss`, each used term, and what evaluation and pictures need."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.ops = ops = resolve_ops(cfg.ops)
        d, terms = cfg.embed_dim, cfg.terms
        self.audio_encoder = Encoder(cfg, 1, (cfg.audio_frames, cfg.audio_bins), cfg.audio_patch, ops)
        self.image_encoder = Encoder(cfg, 3, (cfg.image_size, cfg.image_size), cfg.image_patch, ops)
        a_grid, v_grid = self.audio_encoder.grid, self.image_encoder.grid
        a_pix, v_pix = cfg.audio_patch**2, cfg.image_patch**2 * 3
        if "self_recon" in terms or "cross_conditioned" in terms:
            cond = d if "cross_conditioned" in terms else None
            self.audio_decoder = ReconDecoder(cfg, d, a_grid, a_pix, ops, cond_dim=cond)
            self.image_decoder = ReconDecoder(cfg, d, v_grid, v_pix, ops, cond_dim=cond)
        if "cross_embedding" in terms:
            self.audio_to_image = EmbeddingDecoder(cfg, d, d, v_grid, ops)
            self.image_to_audio = EmbeddingDecoder(cfg, d, d, a_grid, ops)
        self.apply(mae_init_)
        for enc in (self.audio_encoder, self.image_encoder):
            w = enc.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(enc.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, ReconDecoder):
                nn.init.normal_(module.mask_token, std=0.02)
            if isinstance(module, EmbeddingDecoder) and module.mode != "empty":
                nn.init.normal_(module.queries if module.mode == "learnable" else module.mask_token, std=0.02)

    def attentive_tokens(self, enc: Encoded, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(memory, index) for the Cross-Conditioned layer: the visible tokens read through the top-k
        CLS-attention indices, random visible indices, or k zero vectors (the Table 6 ablations)."""
        tokens = enc.latent[:, 1:]
        mode = self.cfg.attentive_tokens
        if mode == "zero":
            return tokens.new_zeros(tokens.shape[0], k, tokens.shape[2]), None
        if mode == "random":
            return tokens, torch.rand(tokens.shape[:2], device=tokens.device).argsort(dim=1)[:, :k]
        q_cls, keys = enc.cls_qk
        index, _ = self.ops.cls_attention_topk(q_cls, keys, k)
        return tokens, index

    def forward(self, audio: torch.Tensor, image: torch.Tensor, noise_audio: torch.Tensor | None = None,
                noise_image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg, terms = self.cfg, self.cfg.terms
        if cfg.ops == "triton" and not use_triton(audio):
            raise ValueError("ops='triton' needs CUDA tensors or TRITON_INTERPRET=1; ops='auto' uses the "
                             "references on the CPU")
        unmasked = cfg.contrastive_inputs == "unmasked" and "contrastive" in terms
        a = v = full_a = full_v = None
        if not unmasked or terms - {"contrastive"}:
            a = self.audio_encoder(audio.unsqueeze(1), cfg.mask_ratio, noise_audio)
            v = self.image_encoder(image, cfg.mask_ratio, noise_image)
        if unmasked or "cross_embedding" in terms:
            # One unmasked pass of each encoder serves both the contrastive features (with gradients,
            # when they come from here) and the Cross-Embedding targets (always detached).
            with torch.set_grad_enabled(unmasked and torch.is_grad_enabled()):
                full_a = self.audio_encoder(audio.unsqueeze(1)).latent
                full_v = self.image_encoder(image).latent
        a_cls, v_cls = (full_a[:, 0], full_v[:, 0]) if unmasked else (a.latent[:, 0], v.latent[:, 0])
        a_global = F.normalize(a_cls.float(), dim=-1)
        v_global = F.normalize(v_cls.float(), dim=-1)
        out: dict[str, torch.Tensor] = dict(audio_global=a_global, image_global=v_global)
        if a is not None:
            out.update(audio_mask=a.mask, image_mask=v.mask, audio_ids_restore=a.ids_restore,
                       image_ids_restore=v.ids_restore, audio_ids_keep=a.ids_keep, image_ids_keep=v.ids_keep)
        if "contrastive" in terms:
            out["contrastive"] = losses.contrastive_loss(a_global, v_global, cfg.temperature)
        if "self_recon" in terms or "cross_conditioned" in terms:
            a_cond = v_cond = a_idx = v_idx = None
            if "cross_conditioned" in terms:
                a_cond, a_idx = self.attentive_tokens(a, cfg.num_attentive(self.audio_encoder.num_patches))
                v_cond, v_idx = self.attentive_tokens(v, cfg.num_attentive(self.image_encoder.num_patches))
                if a_idx is not None:
                    out["audio_attentive"] = a.ids_keep.gather(1, a_idx)
                    out["image_attentive"] = v.ids_keep.gather(1, v_idx)
            a_pred = self.audio_decoder(a.latent, a.ids_restore, v_cond, v_idx)
            v_pred = self.image_decoder(v.latent, v.ids_restore, a_cond, a_idx)
            a_target = losses.patchify_audio(audio, cfg.audio_patch)
            v_target = losses.patchify_image(image, cfg.image_patch)
            recon = losses.recon_loss(a_pred, a_target, a.mask, cfg.norm_pix_loss, cfg.recon_loss_on)
            recon = recon + losses.recon_loss(v_pred, v_target, v.mask, cfg.norm_pix_loss, cfg.recon_loss_on)
            out["cross_conditioned" if "cross_conditioned" in terms else "self_recon"] = recon
            out.update(audio_pred=a_pred, image_pred=v_pred)
        if "cross_embedding" in terms:
            a_full, v_full = full_a[:, 1:].detach(), full_v[:, 1:].detach()
            a_tokens = v_tokens = None
            if cfg.queries == "target-tokens":
                a_tokens, v_tokens = (a.latent[:, 1:], a.ids_restore), (v.latent[:, 1:], v.ids_restore)
            a_hat = self.image_to_audio(v.latent, a_tokens)
            v_hat = self.audio_to_image(a.latent, v_tokens)
            out["cross_embedding"] = losses.embedding_loss(
                a_hat, F.layer_norm(a_full, a_full.shape[-1:])
            ) + losses.embedding_loss(v_hat, F.layer_norm(v_full, v_full.shape[-1:]))
        weights = {"contrastive": cfg.contrastive_weight, "self_recon": 1.0, "cross_conditioned": 1.0,
                   "cross_embedding": 1.0}
        out["loss"] = sum(weights[t] * out[t] for t in sorted(terms))
        return out

    @torch.no_grad()
    def encode(self, audio: torch.Tensor | None = None, image: torch.Tensor | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Unmasked encoder outputs [B, 1 + L, D] (CLS first) for evaluation."""
        a = self.audio_encoder(audio.unsqueeze(1)).latent if audio is not None else None
        v = self.image_encoder(image).latent if image is not None else None
        return a, v

    @torch.no_grad()
    def eval_features(self, audio: torch.Tensor, image: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(audio global, image global, image patch features [B, L, D]) from one unmasked pass of each
        encoder; the global features are the L2-normalised CLS outputs (eq. 1's a and v)."""
        a, v = self.encode(audio, image)
        return F.normalize(a[:, 0].float(), dim=-1), F.normalize(v[:, 0].float(), dim=-1), v[:, 1:]

    @torch.no_grad()
    def query_attention(self, audio: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Learnable Queries' attention over the other modality's unmasked patch tokens:
        `image` [B, audio queries, *image grid] and `audio` [B, image queries, *audio grid]."""
        if "cross_embedding" not in self.cfg.terms:
            return {}
        a, v = self.encode(audio, image)
        a_tokens = v_tokens = None
        if self.cfg.queries == "target-tokens":  # unmasked: every token visible, in place
            a_tokens = (a[:, 1:], torch.arange(a.shape[1] - 1, device=a.device).expand(a.shape[0], -1))
            v_tokens = (v[:, 1:], torch.arange(v.shape[1] - 1, device=v.device).expand(v.shape[0], -1))
        on_image = self.image_to_audio(v, a_tokens, return_attention=True)
        on_audio = self.audio_to_image(a, v_tokens, return_attention=True)
        return {"image": on_image.unflatten(-1, self.image_encoder.grid),
                "audio": on_audio.unflatten(-1, self.audio_encoder.grid)}

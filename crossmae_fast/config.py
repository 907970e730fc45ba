"""Dataclass configs and presets: the model, the data pipeline, training and evaluation.

`model_config(preset, variant, **overrides)` builds a model config; `run_config(values)` builds the
whole `RunConfig` of a pre-training run (sections `model`, `data`, `train`, `eval`) from nested or
flat values with its preset applied. Every field carries its help text in `metadata["help"]`, from
which `crossmae_fast.options` generates command-line options and reads config files: a field added
here is an option of every CLI that uses its section. Invalid values and combinations raise
`ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

VARIANTS: dict[str, frozenset[str]] = {
    "cl-av": frozenset({"contrastive"}),
    "self-mae": frozenset({"self_recon"}),
    "cl-self-mae": frozenset({"contrastive", "self_recon"}),
    "cl-crosscdt-mae": frozenset({"contrastive", "cross_conditioned"}),
    "cl-crossemb-mae": frozenset({"contrastive", "cross_embedding"}),
    "crossmae": frozenset({"contrastive", "cross_conditioned", "cross_embedding"}),
}
"""Loss terms of each variant (paper Table 2)."""

ATTENTIVE_TOKENS = ("topk", "zero", "random")
QUERIES = ("learnable", "empty", "target-tokens")
OPS = ("auto", "triton", "reference")
LOSS_ON = ("masked", "visible")
CONTRASTIVE_INPUTS = ("masked", "unmasked")
LOADERS = ("dali", "torch")
PRECISIONS = ("auto", "bf16", "fp32")
PAPER_BLR = 1.5e-4
SAMPLE_RATE = 16000
"""Audio sample rate (Hz) of every prepared, synthetic and loaded clip."""
NUM_FRAMES = 10
"""JPEG frames extracted per clip, frame i at video frame int(i * total / NUM_FRAMES)."""
EVAL_FRAME = 5
"""The frame evaluation uses (and the box annotations refer to); training draws one at random."""
SYNTH_SECONDS = 3.0
"""Audio (and video) seconds of a synthetic clip (`synth --seconds`, pre-training's `--synth-seconds`)."""
AUDIOSET_FBANK_MEAN, AUDIOSET_FBANK_STD = -5.081, 4.4849
"""Log-mel normalisation (CAV-MAE's AudioSet statistics): (fbank - mean) / std."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""Per-channel image normalisation of the ImageNet MAE encoders."""

PRESETS: dict[str, dict[str, dict]] = {
    # CPU-sized: 64x64 frames (8x8 patches of 8 px), 256x64 fbank (16x4 patches of 16), and the recipe
    # of the default run: 1024 synthetic clips (768 train, 256 eval), 12.5 epochs (300 steps of 32),
    # lr 3e-4 (the paper's base rate learns little in so few steps), contrastive term on the unmasked
    # encoders. Measured in benchmarks/results/learning_experiments.md.
    "tiny": {
        "model": dict(image_size=64, image_patch=8, audio_frames=256, audio_bins=64, audio_patch=16,
                      embed_dim=128, depth=4, num_heads=4, decoder_dim=64, decoder_depth=2, decoder_heads=2,
                      emb_decoder_depth=1,
                      contrastive_inputs="unmasked"),
        "train": dict(blr=2.4e-3, epochs=12.5, synth_clips=1024),
    },
    "base": {"model": dict(embed_dim=768, depth=12, num_heads=12)},
    "large": {"model": dict(embed_dim=1024, depth=24, num_heads=16)},
}
"""Named starting points: per section (`model`, `data`, `train`, `eval`), the fields a preset sets.
Values given in a config file or on the command line override them."""
DEFAULT_PRESET = "tiny"
"""The preset of a run that names none (`run_config`, `python -m crossmae_fast.pretrain`)."""


def opt(default, help: str, choices: tuple | None = None, **meta):
    """A config field with its help text (and allowed values); the options are generated from it.
    Extra metadata: `follows="model"` (the value is copied from that section's field of the same
    name: no option of its own), `const` (the value of a bare `--option`)."""
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not supported")
    return field(default=default, metadata={"help": help, "choices": choices, **meta})


def check_choices(cfg) -> None:
    """Raise ValueError for each field of `cfg` whose value is not one of its `choices`."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(f"{f.name}={getattr(cfg, f.name)!r} is not one of {', '.join(map(repr, choices))}")


@dataclass
class ModelConfig:
    """Architecture, masking and loss settings (docs/design.md, "Model")."""

    preset: str = opt("base", "model size preset; sets the sizes below (the tiny preset also its CPU recipe: "
                      "--contrastive-inputs unmasked, --blr 2.4e-3, --epochs 12.5, --synth-clips 1024); "
                      "options given beside it override its values", choices=tuple(PRESETS))
    variant: str = opt("crossmae", "loss terms (paper Table 2)", choices=tuple(VARIANTS))
    # inputs
    image_size: int = opt(224, "frame side in pixels (the data pipeline crops to it)")
    image_patch: int = opt(16, "image patch side in pixels")
    audio_frames: int = opt(1024, "fbank frames per clip after pad/crop (10 ms shift)")
    audio_bins: int = opt(128, "mel bins of the fbank")
    audio_patch: int = opt(16, "audio patch side (frames and bins)")
    # encoders (one per modality, same shape)
    embed_dim: int = opt(768, "encoder width")
    depth: int = opt(12, "encoder blocks per modality")
    num_heads: int = opt(12, "encoder attention heads")
    mlp_ratio: float = opt(4.0, "MLP hidden width / model width (encoders and decoders)")
    # cross-conditioned / plain reconstruction decoders
    decoder_dim: int = opt(512, "reconstruction decoder width")
    decoder_depth: int = opt(8, "reconstruction decoder blocks")
    decoder_heads: int = opt(16, "reconstruction decoder attention heads")
    # cross-embedding decoders
    emb_decoder_depth: int = opt(4, "cross-embedding decoder blocks")
    # method
    mask_ratio: float = opt(0.75, "share of patches masked per modality, in (0, 1)")
    topk_ratio: float = opt(0.25, "Attentive Tokens kept, as a share of the visible patches, in (0, 1]")
    norm_pix_loss: bool = opt(True, "reconstruct per-patch normalised targets (MAE's norm_pix_loss)")
    recon_loss_on: str = opt("masked", "patches the reconstruction loss averages over", choices=LOSS_ON)
    temperature: float = opt(0.05, "contrastive (InfoNCE) temperature")
    contrastive_weight: float = opt(0.1, "weight of the contrastive term in the total loss")
    contrastive_inputs: str = opt("masked", "encoder outputs the contrastive term compares: 'masked' (the CLS of "
                                  "the masked passes, CAV-MAE's choice, no extra cost) or 'unmasked' (the CLS of "
                                  "an unmasked pass with gradients, as evaluation sees the clips; that pass also "
                                  "gives the Cross-Embedding targets)", choices=CONTRASTIVE_INPUTS)
    attentive_tokens: str = opt("topk", "Attentive Tokens ablation (paper Table 6)", choices=ATTENTIVE_TOKENS)
    queries: str = opt("learnable", "Learnable Queries ablation (paper Table 7)", choices=QUERIES)
    # implementation
    ops: str = opt("auto", "token ops: fused Triton kernels or pure-torch references", choices=OPS)

    def __post_init__(self) -> None:
        check_choices(self)
        for name, size, patch in (
            ("image_size", self.image_size, self.image_patch),
            ("audio_frames", self.audio_frames, self.audio_patch),
            ("audio_bins", self.audio_bins, self.audio_patch),
        ):
            if size <= 0 or patch <= 0 or size % patch:
                raise ValueError(f"{name}={size} must be a positive multiple of its patch size {patch}")
        for name, dim, heads in (
            ("embed_dim", self.embed_dim, self.num_heads),
            ("decoder_dim", self.decoder_dim, self.decoder_heads),
        ):
            if dim % heads:
                raise ValueError(f"{name}={dim} must be divisible by its head count {heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie in (0, 1)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be positive")
        if not self.contrastive_weight >= 0:
            raise ValueError(f"contrastive_weight={self.contrastive_weight} must not be negative")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio={self.topk_ratio} must lie in (0, 1]")
        terms = VARIANTS[self.variant]
        if self.attentive_tokens != "topk" and "cross_conditioned" not in terms:
            raise ValueError(
                f"attentive_tokens={self.attentive_tokens!r} is an ablation of cross-conditioned "
                f"reconstruction, which variant {self.variant!r} does not use"
            )
        if self.queries != "learnable" and "cross_embedding" not in terms:
            raise ValueError(
                f"queries={self.queries!r} is an ablation of cross-embedding reconstruction, "
                f"which variant {self.variant!r} does not use"
            )

    @property
    def terms(self) -> frozenset[str]:
        """Loss terms this variant computes."""
        return VARIANTS[self.variant]

    @property
    def image_grid(self) -> tuple[int, int]:
        return (self.image_size // self.image_patch,) * 2

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, frequency) patch grid; tokens are time-major."""
        return self.audio_frames // self.audio_patch, self.audio_bins // self.audio_patch

    @property
    def num_image_patches(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def num_audio_patches(self) -> int:
        return self.audio_grid[0] * self.audio_grid[1]

    def num_visible(self, num_patches: int) -> int:
        """Visible patches after masking, MAE's `int(L * (1 - mask_ratio))`."""
        return int(num_patches * (1 - self.mask_ratio))

    def num_attentive(self, num_patches: int) -> int:
        """Attentive Tokens: `round(topk_ratio * visible)`, at least one."""
        return max(1, round(self.topk_ratio * self.num_visible(num_patches)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config(preset: str = "base", variant: str = "crossmae", **overrides) -> ModelConfig:
    """Config of a preset (`tiny`, `base`, `large`) and variant, with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {', '.join(map(repr, PRESETS))}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
    return ModelConfig(**{"preset": preset, "variant": variant, **PRESETS[preset].get("model", {}), **overrides})


@dataclass
class DataConfig:
    """How clips become batches: the loader and the input settings (docs/design.md, "Inputs"). Its
    input sizes follow the model (`data_config(model)`, `RunConfig`)."""

    loader: str = opt("dali", "data loader: DALI (GPU or CPU; the torch loader where DALI is missing) or the "
                      "torch DataLoader", choices=LOADERS)
    workers: int = opt(2, "data loader workers (DALI threads)")
    video: bool = opt(False, "decode the frame from each row's \"video\" file where it has one (else its JPEGs)")
    sample_rate: int = opt(SAMPLE_RATE, "audio sample rate in Hz (every clip is resampled to it)")
    audio_frames: int = opt(1024, "fbank frames after pad/crop: the model's audio_frames", follows="model")
    audio_bins: int = opt(128, "mel bins: the model's audio_bins", follows="model")
    frame_shift_ms: float = opt(10.0, "fbank frame shift in ms")
    frame_length_ms: float = opt(25.0, "fbank window length in ms")
    # None: the train manifest's statistics (data/normalisation.py), else AudioSet's. AudioMAE's
    # would be audio_mean=-4.2677393, audio_std=2 * 4.5689974.
    audio_mean: float | None = opt(None, "fbank mean subtracted before dividing by --audio-std; default: the train "
                                   "manifest's statistics (prepare and synth store them), else AudioSet's -5.081")
    audio_std: float | None = opt(None, "fbank standard deviation the features are divided by; default: as "
                                  "--audio-mean (AudioSet's 4.4849)")
    image_size: int = opt(224, "frame side after resize and centre crop: the model's image_size", follows="model")
    image_mean: tuple[float, float, float] = opt(IMAGENET_MEAN, "per-channel RGB mean (0-1 scale)")
    image_std: tuple[float, float, float] = opt(IMAGENET_STD, "per-channel RGB standard deviation")
    num_frames: int = opt(NUM_FRAMES, "frames extracted per clip (training draws one at random)")
    eval_frame: int = opt(EVAL_FRAME, "the frame evaluation uses")
    freqm: int = opt(0, "SpecAugment on training batches: one mel band of width < N masked per clip (CAV-MAE: 48)")
    timem: int = opt(0, "SpecAugment on training batches: one run of < N fbank frames masked per clip (CAV-MAE: "
                     "192)")

    def __post_init__(self) -> None:
        check_choices(self)
        self.image_mean, self.image_std = tuple(map(float, self.image_mean)), tuple(map(float, self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (R, G, B)")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers} must not be negative")
        if not ((self.audio_std is None or self.audio_std > 0) and min(self.image_std) > 0):
            raise ValueError("audio_std and image_std must be positive")
        if self.freqm < 0 or self.timem < 0:
            raise ValueError(f"freqm={self.freqm} and timem={self.timem} must not be negative")
        if not 0 <= self.eval_frame < self.num_frames:
            raise ValueError(f"eval_frame={self.eval_frame} must lie in [0, num_frames={self.num_frames})")

    def audio_norm(self) -> tuple[float, float]:
        """(mean, std) the fbank is normalised with; AudioSet's where unset (loaders resolve them first)."""
        mean = AUDIOSET_FBANK_MEAN if self.audio_mean is None else self.audio_mean
        return mean, AUDIOSET_FBANK_STD if self.audio_std is None else self.audio_std

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_config(model: ModelConfig | None = None, **overrides) -> DataConfig:
    """Data config whose input sizes match `model` (default: the base preset)."""
    model = model or model_config("base")
    return DataConfig(**{**_followed(DataConfig, model), **overrides})


@dataclass
class TrainConfig:
    """The optimisation and the run: length, learning rate, where it writes, how it runs."""

    data: str | None = opt(None, "train manifest (CAV-MAE JSON, or a shard folder's shards.json); default: a "
                           "cached synthetic set")
    batch_size: int = opt(32, "samples per process and step")
    epochs: float = opt(24.0, "training length in epochs of the train manifest")
    steps: int | None = opt(None, "training length in optimisation steps; overrides --epochs")
    blr: float = opt(PAPER_BLR, "base learning rate; lr = blr * global batch / 256")
    lr: float | None = opt(None, "absolute learning rate; overrides --blr")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine")
    warmup: str = opt("5%", "linear warm-up: N steps ('500'), epochs ('2ep') or a share of the run ('5%')")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms, tokens, queries)")
    seed: int = opt(0, "random seed (model init, masking, data order)")
    init: str | None = opt(None, "ImageNet MAE / timm ViT checkpoint for both encoders")
    out: str = opt("runs/pretrain", "output folder: checkpoints, metrics.jsonl, encoders, evaluation")
    resume: str | None = opt(None, "'auto' (latest checkpoint in --out, else start fresh) or a checkpoint path",
                             const="auto")
    save_every: int = opt(50, "steps between checkpoints (0: only at the end)")
    keep: int = opt(2, "checkpoints kept (the newest)")
    log_every: int = opt(10, "steps between progress lines / metrics records (one host sync each)")
    tensorboard: bool = opt(False, "also write the metrics records as TensorBoard event files (OUT/tensorboard; "
                            "needs the tensorboard package)")
    time_limit: float | None = opt(None, "minutes after which the run saves a checkpoint and stops (resume "
                                   "continues it)")
    max_skip_fraction: float = opt(0.05, "stop the run when more than this share of the clips seen were "
                                   "unreadable and replaced (checked at each progress line)")
    device: str = opt("auto", "'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    precision: str = opt("auto", "autocast dtype; auto = bf16 on CUDA, fp32 on the CPU", choices=PRECISIONS)
    cuda_graph: bool = opt(True, "capture the train step in one CUDA graph (CUDA only)")
    compile: bool = opt(False, "torch.compile the model")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default, or 1 on a busy machine")
    export_encoders: bool = opt(True, "write timm state dicts encoder_audio.pth / encoder_image.pth at the end")
    synth_clips: int = opt(256, "clips of the default synthetic set (a quarter go to its eval.json)")
    synth_seconds: float = opt(SYNTH_SECONDS, "audio seconds per synthetic clip")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("batch_size", "log_every", "keep", "synth_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be at least 1")
        for name in ("save_every", "threads", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must not be negative")
        for name in ("epochs", "synth_seconds", "blr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be positive")
        for name in ("steps", "lr", "time_limit"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be positive")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"--weight-decay={self.weight_decay} must lie in [0, 1)")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"--max-skip-fraction={self.max_skip_fraction} must lie in [0, 1]")
        if not re.fullmatch(r"\d+|\d+(\.\d*)?(ep|%)", str(self.warmup)):
            raise ValueError(f"--warmup={self.warmup!r}: expected steps ('500'), epochs ('2ep') or a share ('5%')")
        check_device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SummaryConfig:
    """The evaluation that ends a pre-training run (`evaluate()` with an `EvalConfig` built from the run)."""

    eval_data: str | None = opt(None, "evaluation manifest (or shards.json) for the final summary; default: the "
                                "synthetic set's eval.json (none with --data unless given)")
    eval_pictures: int = opt(2, "pictures drawn by the final evaluation (each takes seconds on a CPU)")

    def __post_init__(self) -> None:
        if self.eval_pictures < 0:
            raise ValueError(f"--eval-pictures={self.eval_pictures} must not be negative")


GT_MODES = ("vggss", "flickr")


@dataclass
class EvalConfig:
    """What `evaluate()` takes besides the model, the manifest and the data settings, and what
    `python -m crossmae_fast.evaluate` takes besides the data settings (its options are these fields)."""

    checkpoint: str | None = opt(None, "checkpoint file, or a run folder (its latest checkpoint)")
    data: str | None = opt(None, "CAV-MAE manifest (or shards.json) to evaluate; its rows with 'bbox' score "
                           "localization")
    out: str | None = opt(None, "output folder for metrics.json and pictures (default: eval/ in the checkpoint's "
                          "run folder)")
    pictures: int = opt(4, "clips to draw pictures for (those with boxes first)")
    batch_size: int = opt(32, "clips per batch")
    device: str = opt("auto", "'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    gt_mode: str = opt("vggss", "box consensus: union (VGG-SS, synthetic) or annotators' sum / 2 (Flickr-SoundNet)",
                       choices=GT_MODES)
    map_size: int = opt(224, "side of the localization map")
    seed: int = opt(0, "masking noise of the pictures")
    probe_data: str | None = opt(None, "train a localization probe on this manifest's clips (the run's train "
                                 "split) on top of the frozen encoders, and score its maps too")
    probe_steps: int = opt(300, "probe training steps")
    probe_seeds: tuple[int, ...] = opt((0, 1, 2, 3, 4), "one probe per seed, scored separately, averaged and with "
                                       "their standard deviation (one probe seed moves a figure as much as training)")
    save_probe: str | None = opt(None, "write the trained probe heads (one per probe seed) to this file, for "
                                 "localize --probe; needs --probe-data")

    def __post_init__(self) -> None:
        check_choices(self)
        self.probe_seeds = tuple(int(s) for s in self.probe_seeds)
        for name in ("batch_size", "map_size", "probe_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be at least 1")
        if self.pictures < 0:
            raise ValueError(f"--pictures={self.pictures} must not be negative")
        if not self.probe_seeds:
            raise ValueError("--probe-seeds: give at least one")
        if self.save_probe and not self.probe_data:
            raise ValueError("--save-probe needs --probe-data (the manifest the probe is trained on)")
        check_device(self.device)


@dataclass
class EvaluateConfig:
    """Everything `python -m crossmae_fast.evaluate` depends on: the evaluation and the data settings
    (the checkpoint's own, with the options given on the command line over them)."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class RunConfig:
    """Everything a pre-training run depends on, by section. `run_config` applies presets; the
    constructor takes the sections as they are (the data sizes are copied from the model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: SummaryConfig = field(default_factory=SummaryConfig)

    def __post_init__(self) -> None:
        self.data = dataclasses.replace(self.data, **_followed(DataConfig, self.model))

    def to_dict(self) -> dict:
        """{section: {field: value}}: what a checkpoint stores and `from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> RunConfig:
        """The config `to_dict` wrote (no preset applied; a field missing takes its default)."""
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(unknown)}")
        return cls(**{name: _section(make, values.get(name, {}), name) for name, make in sections.items()})


def run_config(values: Mapping | None = None, **flat) -> RunConfig:
    """A `RunConfig` from dataclass defaults <- the preset (`model.preset`, default `tiny`) <- `values`
    (nested `{"train": {"steps": 5}}` or flat `{"steps": 5}`) <- keyword arguments (flat)."""
    from crossmae_fast.options import merge, nest

    nested = merge(nest(RunConfig, values or {}), nest(RunConfig, flat))
    preset = nested.get("model", {}).get("preset", DEFAULT_PRESET)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {', '.join(map(repr, PRESETS))}")
    sections = merge(PRESETS[preset], nested)
    sections["model"] = {**sections.get("model", {}), "preset": preset}
    return RunConfig.from_dict(sections)


def _section(make, values: Mapping, name: str):
    try:
        return make(**values)
    except TypeError as e:  # an unknown field
        raise ValueError(f"config section {name!r}: {e}") from None


def _followed(cls, source) -> dict:
    """Values of `cls`'s fields that follow `source`'s fields of the same name."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.metadata.get("follows")}


def check_device(device: str) -> None:
    """Raise ValueError unless `device` is 'auto', 'cpu', 'cuda' or 'cuda:N' (components/distributed.py
    `pick_device` resolves it)."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"--device={device!r} is not 'auto', 'cpu' or 'cuda[:N]'")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# --- fine-tuning and linear probing (crossmae_fast.finetune) ---------------------------------------------

CLASSIFY_MODES = ("av", "audio", "visual")
POOLS = ("cls", "mean")
LOSSES = ("auto", "bce", "ce")
CAVMAE_BATCH = 36
"""CAV-MAE's AudioSet-20K batch; the fine-tuning base lr is set so this batch gets its lr of 5e-5."""

FINETUNE_PRESETS: dict[str, dict[str, dict]] = {
    # CPU-sized recipe for the synthetic set (benchmarks/results/finetune.md): short, no regularisers
    # that the 768-clip set does not need, SpecAugment scaled to the 256 x 64 fbank.
    "tiny": {
        "train": dict(batch_size=32, epochs=4.0, blr=4e-3, warmup="1ep", synth_clips=1024),
        "data": dict(freqm=12, timem=48),
        "classify": dict(head_lr_scale=10.0, mixup=0.0, label_smoothing=0.0, drop_path=0.0),
    },
    "base": {},
    "large": {},
}
"""Fine-tuning recipe by model preset (defaults: CAV-MAE's AudioSet-20K recipe, README "Fine-tuning")."""


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The optimisation of a fine-tuning run; the fields of `TrainConfig` with fine-tuning's defaults."""

    init: str | None = opt(None, "encoders to start from (required): a pre-training run folder or checkpoint, "
                           "exported timm encoders (a folder with encoder_audio.pth / encoder_image.pth, or the "
                           "files joined by ','), an ImageNet MAE / timm ViT checkpoint, or 'none' (random init, "
                           "the control)")
    batch_size: int = opt(CAVMAE_BATCH, "samples per process and step")
    epochs: float = opt(15.0, "training length in epochs of the train manifest")
    blr: float = opt(5e-5 * 256 / CAVMAE_BATCH, "base learning rate of the encoders; lr = blr * global batch / 256 "
                     "(CAV-MAE's 5e-5 at batch 36)")
    warmup: str = opt("2ep", "linear warm-up: N steps ('500'), epochs ('2ep') or a share of the run ('5%')")
    out: str = opt("runs/finetune", "output folder: checkpoints, metrics.jsonl, eval/")
    save_every: int = opt(0, "steps between checkpoints besides the one at each epoch's end (0: none)")
    keep: int = opt(1, "epoch checkpoints kept (the newest)")
    export_encoders: bool = opt(False, "not used by fine-tuning", hidden=True)


@dataclass
class ClassifyConfig:
    """What is classified and how: labels, head, loss and the CAV-MAE / MAE fine-tuning recipe."""

    eval_data: str | None = opt(None, "evaluation manifest scored after every epoch; default: the synthetic set's "
                                "eval.json (with --data: none, so give one)")
    label_csv: str | None = opt(None, "CAV-MAE class_labels_indices.csv (index,mid,display_name); default: the "
                                "sorted labels of the train manifest")
    mode: str = opt("av", "encoders used: both (pooled features concatenated), audio or visual only",
                    choices=CLASSIFY_MODES)
    pool: str = opt("cls", "feature of each encoder: its CLS output or the mean of its patch tokens", choices=POOLS)
    linear_probe: bool = opt(False, "freeze the encoders; BatchNorm without affine before the linear head (MAE)")
    loss: str = opt("auto", "auto: BCE (and mAP) when a train clip has several labels, else cross-entropy (and "
                    "accuracy)", choices=LOSSES)
    head_lr_scale: float = opt(100.0, "learning-rate multiplier of the head (CAV-MAE's head_lr: 100 AS-20K, 50 "
                               "AS-2M, 10 VGGSound)")
    layer_decay: float = opt(1.0, "layer-wise lr decay: block i of depth d learns at layer_decay**(d - i) (MAE "
                             "0.65-0.75; 1 = off, CAV-MAE)")
    drop_path: float = opt(0.1, "stochastic depth rate of the last block (MAE 0.1)")
    mixup: float = opt(0.5, "share of training clips mixed with another, lambda ~ Beta(10, 10), one for audio, "
                       "image and labels (CAV-MAE 0.5)")
    label_smoothing: float = opt(0.1, "targets smoothed to (1 - s) * t + s / classes (CAV-MAE 0.1)")
    balanced: str | None = opt(None, "balanced sampling (AudioSet-2M): draw train clips with replacement by "
                               "CAV-MAE's weights, computed ('auto') or read from a file of the labels tool",
                               const="auto")
    train_per_class: int | None = opt(None, "train on N clips per class only (chosen by --seed): the few-label "
                                      "setting")
    average_last: int = opt(1, "evaluate the mean of the last K epochs' weights at the end (CAV-MAE's weight "
                            "averaging; 1 = the last epoch's)")
    eval_frames: int = opt(1, "frames per clip at the end: probabilities averaged over N evenly spaced frames "
                           "(CAV-MAE: 10)")
    eval_every: int = opt(1, "epochs between scores of the eval set during training (0: only the final score)")
    eval_missing: bool = opt(False, "also score an av model with the audio / the visual input missing at the end")
    eval_only: bool = opt(False, "evaluate the fine-tuned checkpoint (--resume, default the latest in --out); no "
                          "training")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("head_lr_scale", "layer_decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be positive")
        for name in ("drop_path", "mixup", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must lie in [0, 1)")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every={self.eval_every} must not be negative")
        for name in ("average_last", "eval_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)}={getattr(self, name)} must be at least 1")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ValueError(f"--train-per-class={self.train_per_class} must be at least 1")
        if self.eval_missing and self.mode != "av":
            raise ValueError("--eval-missing needs --mode av (a model that takes both inputs)")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on: the encoders' architecture, the data, the optimisation
    and the classification settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def __post_init__(self) -> None:
        self.data = dataclasses.replace(self.data, **_followed(DataConfig, self.model))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> FinetuneConfig:
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(unknown)}")
        return cls(**{name: _section(make, values.get(name, {}), name) for name, make in sections.items()})


def finetune_config(values: Mapping | None = None, base_model: Mapping | None = None) -> FinetuneConfig:
    """A `FinetuneConfig` from dataclass defaults <- the pre-trained model's config (`base_model`, from
    the --init checkpoint) <- its preset's fine-tuning recipe <- `values` (nested or flat)."""
    from crossmae_fast.options import merge, nest

    nested = nest(FinetuneConfig, values or {})
    model = {**(base_model or {}), **nested.get("model", {})}
    preset = model.get("preset", DEFAULT_PRESET)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {', '.join(map(repr, PRESETS))}")
    model = {**PRESETS[preset].get("model", {}), **model, "preset": preset}
    sections = merge(FINETUNE_PRESETS[preset], {**nested, "model": model})
    return FinetuneConfig.from_dict(sections)

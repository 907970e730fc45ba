"""DALI loader: the input features of docs/design.md in one DALI pipeline; the device is the only difference.

`device_id=None` (a CPU training device) runs every operator on the CPU; with a CUDA device, JPEGs
decode through nvJPEG (`mixed`), and the waveform, after CPU decoding (`decoders.audio`: WAV, FLAC,
OGG; downmix and resampling to 16 kHz), goes to the GPU for the log-mel. Python only reads file bytes
(`ClipSet` gives the same rows, order, frames and replacements as the torch loader).

Video (`video=True`): a row with a `"video"` file sends its bytes and the chosen frame's index (PyAV
demuxes the bytes to count frames, no decoding) to `decoders.video` (FFmpeg on the CPU: VP8, VP9,
MJPEG; NVDEC through `mixed` on a GPU: also H.264, HEVC, AV1, MPEG-4); a per-sample conditional sends
the other rows through the JPEG decoder. Rows whose codec this device's decoder lacks (H.264 on the
CPU) use their JPEG frames, with one warning per codec.

Log-mel, equal to torchaudio's Kaldi fbank with the same settings up to float rounding and the
mel triangles: each 25 ms frame is cut out explicitly (hop-sized blocks side by side), loses its own DC
offset and is pre-emphasised (0.97) as Kaldi does per frame; then `spectrogram` over the frames laid end
to end (400-sample symmetric Hann window = Kaldi's 'hanning', step 400, nfft 512, power 2, no centre
padding), `mel_filter_bank(htk, 20 Hz..Nyquist, unnormalised)`, natural log floored at float32 epsilon
(Kaldi's floor); then pad/crop and normalise as in `fbank.audio_features`. Residual against
torchaudio's Kaldi fbank on 10 s harmonic-plus-noise mixtures: mean |diff| ~0.002 in log units,
correlation > 0.99999 (DALI's triangles are linear in Hz, Kaldi's in mel). The shortcut
(`preemphasis_filter` and mean subtraction on the whole clip, window step 160) saves the framing
copies but leaves the DC leakage of each frame, which pre-emphasis makes dominant in the lowest mel
bins: on the same mixtures mean |diff| 0.010-0.026 and correlation down to 0.9976, outside the tests'
0.02 / 0.999 bounds for some clips.

Bad files: bytes that are missing, empty or of an unknown format are caught while reading. A file
that passes that check but fails to decode breaks the DALI pipeline; the loader then decodes each
pending sample alone to find the culprits, marks them bad, rebuilds the pipeline and resumes at the
failed batch, so the epoch goes on with replacements and no exception.
"""

from __future__ import annotations

import io
import math
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray

from crossmae_fast.config import DataConfig
from crossmae_fast.data.clips import ClipLoader, log

KALDI_EPS = float(np.finfo(np.float32).eps)
PREEMPH = 0.97
AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG")
VIDEO_CODECS = {False: {"vp8", "vp9", "mjpeg"}, True: {"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"}}
NOTHING = np.zeros(0, np.uint8)


def read_bytes(path: str | io.BytesIO, magic: tuple[bytes, ...]) -> np.ndarray:
    """Contents of a file (or of a shard member's bytes) as uint8; `ValueError` when empty or not one
    of the expected formats."""
    if isinstance(path, io.BytesIO):
        data, path = np.frombuffer(path.getbuffer(), dtype=np.uint8), "shard member"
    else:
        data = np.fromfile(path, dtype=np.uint8)
    if not any(data[: len(m)].tobytes() == m for m in magic):
        raise ValueError(f"{path}: empty or not a supported format (header {data[:4].tobytes()!r})")
    return data


def log_mel(audio, cfg: DataConfig, gpu: bool):
    """Kaldi fbank of CPU waveforms, `[audio_frames, audio_bins]`, normalised; on the GPU when `gpu`."""
    win = round(cfg.sample_rate * cfg.frame_length_ms / 1000)
    hop = round(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    span = -(-win // hop)  # hop-sized blocks a window touches
    # Frames Kaldi yields (snip_edges), capped at the ones kept; only their samples are read. A clip
    # shorter than a window yields none (all padding); DALI needs one, computed and zeroed below.
    frames = dmath.min(cfg.audio_frames, dmath.max(audio.shape(dtype=types.INT32)[0] - win + hop, 0) // hop)
    audio = audio.gpu() if gpu else audio
    audio = fn.slice(audio, start=[0], shape=(dmath.max(frames, 1) + span - 1) * hop, axes=[0],
                     out_of_bounds_policy="pad")
    blocks = fn.reshape(audio, shape=[-1, hop])
    # Frame t = blocks t .. t + span - 1, the last one cut to the window length: [frames, win].
    parts = [blocks[j:j - span + 1] for j in range(span - 1)] + [blocks[span - 1:, :win - (span - 1) * hop]]
    x = fn.cat(*parts, axis=1)
    x = x - fn.reductions.mean(x, axes=[1], keep_dims=True)  # Kaldi removes each frame's DC offset
    x = fn.cat(x[:, :1] * (1 - PREEMPH), x[:, 1:] - PREEMPH * x[:, :-1], axis=1)  # and pre-emphasises it
    window = np.hanning(win).astype(np.float32).tolist()  # symmetric, like Kaldi's 'hanning'
    spec = fn.spectrogram(fn.reshape(x, shape=[-1]), nfft=2 ** math.ceil(math.log2(win)), window_length=win,
                          window_step=win, window_fn=window, center_windows=False, power=2, layout="tf")
    mel = fn.mel_filter_bank(spec, sample_rate=cfg.sample_rate, nfilter=cfg.audio_bins, freq_low=20.0,
                             freq_high=cfg.sample_rate / 2, mel_formula="htk", normalize=False)
    logmel = fn.to_decibels(mel, multiplier=math.log(10), reference=1.0, cutoff_db=math.log(KALDI_EPS))
    keep = fn.cast(frames > 0, dtype=types.FLOAT)
    logmel = logmel * (keep.gpu() if gpu else keep)
    logmel = fn.slice(logmel, start=[0], shape=[cfg.audio_frames], axes=[0], out_of_bounds_policy="pad")
    mean, std = cfg.audio_norm()
    return (logmel - mean) * (1.0 / std)


def resize_center_crop(image, shape, size: int):
    """`media.resize_center_crop` in DALI: short side to `size`, long side `floor(size * long / short)`,
    bicubic (antialiased when shrinking, as PIL), then a `size` square at `round((new - size) / 2)`
    with Python's round-half-to-even (torchvision's `CenterCrop` rule)."""
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    nh, nw = (dmath.max(size, dmath.floor(x * size / short)) for x in (h, w))
    image = fn.resize(image, size=fn.stack(nh, nw), interp_type=types.INTERP_CUBIC, antialias=True)
    start = fn.cast(fn.stack(_round_half_even((nh - size) / 2), _round_half_even((nw - size) / 2)),
                    dtype=types.INT32)
    return fn.slice(image, start=start, shape=[size, size], axes=[0, 1])


def _round_half_even(half):
    """Python's `round` for values that are whole or halves (the crop offsets)."""
    low = dmath.floor(half)
    frac = half - low  # 0 or 0.5
    low_is_odd = low - 2 * dmath.floor(low / 2)
    return low + 2 * frac * low_is_odd


def decode_jpeg(image_bytes, device: str):
    """Decoded RGB image and its [h, w, c] shape."""
    image = fn.decoders.image(image_bytes, device=device, output_type=types.RGB,
                              adjust_orientation=False)  # PIL ignores EXIF orientation too
    return image, fn.peek_image_shape(image_bytes, dtype=types.FLOAT)


@pipeline_def(enable_conditionals=True)
def clip_pipeline(source, cfg: DataConfig, gpu: bool, video: bool = False):
    """(audio bytes, image bytes[, video bytes, frame index, frame [h, w], use video]) from `source`
    -> (normalised log-mel, normalised CHW image)."""
    dev = "mixed" if gpu else "cpu"
    if video:
        audio_bytes, image_bytes, video_bytes, frame, hw, use_video = fn.external_source(
            source=source, num_outputs=6, batch=True,
            dtype=[types.UINT8, types.UINT8, types.UINT8, types.INT32, types.FLOAT, types.BOOL])
        if use_video:  # per sample: DALI splits the batch between the branches
            image, shape = fn.decoders.video(video_bytes, frames=frame, device=dev)[0], hw
        else:
            image, shape = decode_jpeg(image_bytes, dev)
    else:
        audio_bytes, image_bytes = fn.external_source(source=source, num_outputs=2, batch=True,
                                                      dtype=types.UINT8)
        image, shape = decode_jpeg(image_bytes, dev)
    audio, _ = fn.decoders.audio(audio_bytes, downmix=True, sample_rate=cfg.sample_rate, dtype=types.FLOAT)
    image = resize_center_crop(image, shape, cfg.image_size)
    image = fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                     mean=[255 * m for m in cfg.image_mean],
                                     std=[255 * s for s in cfg.image_std])
    return log_mel(audio, cfg, gpu), image


class _Feed:
    """DALI's batch source: reads the bytes of the planned batches, replacing bad rows as it goes."""

    def __init__(self, loader: DaliLoader, batches: list[np.ndarray]):
        self.loader, self.batches, self.pos = weakref.proxy(loader), batches, 0
        self.issued: list[list[int]] = []  # rows actually read for every batch handed to DALI

    def __call__(self):
        if self.pos >= len(self.batches):
            raise StopIteration
        rows, samples = [], []
        for row in self.batches[self.pos]:
            row, sample = self.loader.read(int(row))
            rows.append(row), samples.append(sample)
        self.issued[self.pos:] = [rows]
        self.pos += 1
        return [list(col) for col in zip(*samples)]

    def replaced(self, k: int) -> int:
        return sum(int(a != b) for a, b in zip(self.issued[k], self.batches[k]))


class DaliLoader(ClipLoader):
    """`make_loader(..., backend="dali")`: batches of `audio` [B, T, F], `image` [B, 3, H, W], `index` [B]."""

    def __init__(self, manifest, **kwargs):
        super().__init__(manifest, **kwargs)
        self.torch_device = torch.device(self.device)
        self.gpu = self.torch_device.type == "cuda"
        if self.gpu and self.torch_device.index is None:
            self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self.device_id = self.torch_device.index if self.gpu else None
        self._pipe, self._feed = None, _Feed(self, [])
        self._codecs_warned: set[str] = set()

    def sample(self, row: int) -> tuple[np.ndarray, ...]:
        """The pipeline's inputs for `row`; `OSError` / `ValueError` for a file that cannot be used."""
        frame = self.clips.frame(row, self.train, self.seed, self.epoch)
        audio = read_bytes(self.clips.audio_file(row), AUDIO_MAGIC)
        if not self.video:
            return audio, read_bytes(self.clips.frame_file(row, frame), IMAGE_MAGIC)
        path = self.clips.video(row)
        if path:
            data = np.fromfile(path, dtype=np.uint8)
            index, k = self.clips.video_frame(row, frame, data.tobytes())
            if index.codec in VIDEO_CODECS[self.gpu]:
                return (audio, NOTHING, data, np.array([k], np.int32),
                        np.array([index.height, index.width], np.float32), np.array(True))
            if index.codec not in self._codecs_warned:
                self._codecs_warned.add(index.codec)
                log.warning("data: DALI cannot decode %s video on the %s; those rows use their JPEG frames",
                            index.codec, "GPU" if self.gpu else "CPU")
        return (audio, read_bytes(self.clips.frame_file(row, frame), IMAGE_MAGIC), NOTHING,
                np.zeros(1, np.int32), np.zeros(2, np.float32), np.array(False))

    def read(self, row: int) -> tuple[int, tuple[np.ndarray, ...]]:
        """(row, pipeline inputs) of `row` or of its replacement."""
        while True:
            if row in self.stats.bad:
                row = self.clips.replacement(row, self.stats.bad)
                continue
            try:
                return row, self.sample(row)
            except (OSError, ValueError) as e:
                self.stats.mark_bad(row, f"{type(e).__name__}: {e}")

    def _build(self, source, batch_size: int, **kwargs):
        pipe = clip_pipeline(source, self.cfg, self.gpu, self.video, batch_size=batch_size,
                             num_threads=max(1, self.num_workers), device_id=self.device_id, **kwargs)
        pipe.build()
        return pipe

    def _find_bad(self, rows: list[int], error: RuntimeError) -> None:
        """Decode each of `rows` alone and mark those DALI fails on as bad; re-raise `error` when that
        explains nothing (no row fails alone, or all of several do: a pipeline problem, not a file)."""
        rows = list(dict.fromkeys(rows))
        failed = {}
        for row in rows:
            sample = [[x] for x in self.sample(row)]
            pipe = self._build(iter([sample]), 1, prefetch_queue_depth=1, exec_async=False,
                               exec_pipelined=False)
            try:
                pipe.run()
            except RuntimeError as e:
                failed[row] = f"DALI cannot decode it: {_dali_cause(e)}"
        if not failed or (len(failed) == len(rows) > 1):
            raise RuntimeError(f"DALI failed on rows {rows}, and not because of one bad file") from error
        for row, reason in failed.items():
            self.stats.mark_bad(row, reason)

    def _to_torch(self, tensors) -> torch.Tensor:
        tensors = tensors.as_tensor()
        out = torch.empty(tensors.shape(), dtype=torch.float32, device=self.torch_device)
        stream = torch.cuda.current_stream(self.torch_device) if self.gpu else None
        feed_ndarray(tensors, out, cuda_stream=stream)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._feed = feed = _Feed(self, self.plan())
        # The source must not hold the loader: a loader <-> pipeline cycle leaves the pipeline to the
        # cyclic GC, which may finalise it in a forked DataLoader worker, where its threads are gone.
        loader = weakref.ref(self)
        done = 0
        while done < len(feed.batches):
            if self._pipe is None:
                self._pipe = self._build(lambda: loader()._feed(), self.batch_size)
            else:
                self._pipe.reset()
            feed.pos = done
            try:
                while True:
                    audio, image = self._pipe.run()
                    rows = torch.tensor(feed.issued[done], dtype=torch.int64)
                    if self.torch_device.type == "cuda":  # pinned: the copy below must not sync
                        rows = rows.pin_memory()
                    batch = {"audio": self._to_torch(audio), "image": self._to_torch(image),
                             "index": rows.to(self.torch_device, non_blocking=True)}
                    self.stats.replaced += feed.replaced(done)
                    done += 1
                    yield batch
            except StopIteration:
                continue
            except RuntimeError as e:
                log.warning("data: DALI failed on a batch (%s); locating the bad file", _dali_cause(e))
                self._pipe = None  # a failed pipeline cannot run again
                self._find_bad([r for rows in feed.issued[done:feed.pos] for r in rows], e)
            finally:
                if done < len(feed.batches) and self._pipe is not None and feed.pos > done:
                    self._pipe = None  # left mid-epoch with prefetched batches: start afresh next time


def _dali_cause(error: RuntimeError) -> str:
    """The informative line of a DALI pipeline error (the operator's own message)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    skip = ("Critical error", "Current pipeline", "C++ context", "File ", "which was used", "encountered")
    useful = [ln for ln in lines if not ln.startswith(skip)]
    return useful[-1] if useful else (lines[0] if lines else repr(error))

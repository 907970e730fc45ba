"""Make the README's localization picture (docs/localize_synthetic.png) from a trained run.

    python docs/localize_picture.py --checkpoint RUN --probe PROBE [--clips 4] [--out docs/localize_synthetic.png]

Writes a small `synth --video` set (64 px, the tiny preset's size; eval clips not seen in training),
muxes each clip's video with its WAV (`mux_clip`: `synth` keeps them apart), runs
`python -m crossmae_fast.localize` on them twice (the zero-shot map, then `--probe PROBE`) and puts
frame 5 of each clip side by side: the frame with the sounding object's box, the zero-shot map, the
probe's map.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from crossmae_fast import localize
from crossmae_fast.data.manifest import read_manifest
from crossmae_fast.data.synthetic import make_synthetic_set
from crossmae_fast.eval.video import mux_clip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--probe", required=True)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7, help="seed of the small synthetic set (default 7)")
    ap.add_argument("--out", default="docs/localize_synthetic.png")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_synthetic_set(tmp / "set", a.clips + 1, a.seed, video=True, seconds=3.0, image_size=64,
                                   eval_fraction=a.clips / (a.clips + 1))
        rows = read_manifest(paths["eval"])[: a.clips]
        videos = [str(mux_clip(r["video"], r["wav"], tmp / "videos" / f"{r['video_id']}.mkv")) for r in rows]
        for kind, extra in (("zero-shot", []), ("probe", ["--probe", a.probe])):
            rc = localize.main([*videos, "--checkpoint", a.checkpoint, "--out", str(tmp / kind), *extra])
            if rc:
                return rc
        fig = Figure(figsize=(2.0 * a.clips, 6.3), layout="constrained")
        axes = fig.subplots(3, a.clips, squeeze=False)
        for j, row in enumerate(rows):
            name = Path(videos[j]).stem
            panels = [Image.open(Path(row["video_path"]) / "frame_5" / f"{row['video_id']}.jpg").convert("RGB"),
                      Image.open(tmp / "zero-shot" / name / "frame_5.png"),
                      Image.open(tmp / "probe" / name / "frame_5.png")]
            peaks = [None] + [json.loads((tmp / k / name / "localization.json").read_text())["frames"][5]["peak_xy"]
                              for k in ("zero-shot", "probe")]
            for i, (ax, img, p) in enumerate(zip(axes[:, j], panels, peaks)):
                w, h = img.size
                ax.imshow(np.asarray(img), extent=(0, w, h, 0))
                x0, y0, x1, y1 = row["bbox"][0]
                ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                       edgecolor="white", linewidth=1.5, linestyle="--" if i else "-"))
                if p is not None:
                    ax.plot([p[0] * w], [p[1] * h], marker="+", color="white", markersize=10)
                ax.axis("off")
            axes[0, j].set_title(f"sound: {row['labels'].replace('_', ' ')}", fontsize=9)
        for i, label in enumerate(("frame, sounding box", "zero-shot map", "probe map")):
            axes[i, 0].text(-0.08, 0.5, label, transform=axes[i, 0].transAxes, rotation=90, va="center",
                            ha="right", fontsize=9)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=72)
        Image.open(buf).convert("RGB").quantize(256).save(a.out, format="PNG", optimize=True)  # small file
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

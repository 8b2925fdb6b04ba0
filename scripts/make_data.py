"""Write the sample images in data/ from the digits TEST split, deterministically.

    .venv/bin/python scripts/make_data.py [--out data]

Each file is a held-out digit drawn the way a person would send it (see
``torchship.zoo.digits.render_digit``). For every file the script takes the first test
image of the wanted label that the default CNN *and* MLP classify correctly after
``torchship.preprocessing`` (the CNN with probability >= 0.9), so the samples work as
smoke tests for any server. ``data/README.md`` lists each file with its true label.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from torchship.preprocessing import preprocess_image
from torchship.zoo import digits

ROOT = Path(__file__).resolve().parent.parent
MIN_PROBABILITY = 0.9


@dataclass(frozen=True)
class Sample:
    name: str
    label: int
    description: str
    draw: Callable[[np.ndarray], Image.Image]
    save: dict[str, object]


def _pen(
    raw: np.ndarray, *, dark_on_light: bool = True, offset: tuple[float, float] = (0.0, 0.0)
) -> Image.Image:
    """A 96 px digit on a canvas 1 + 2/6 times larger: 128x128, like a drawing app's."""
    return digits.render_digit(
        raw, size=96, margin=1 / 6, pen=True, dark_on_light=dark_on_light, offset=offset
    )


def _transparent(raw: np.ndarray) -> Image.Image:
    """Navy strokes on a fully transparent canvas, as browser canvases export them."""
    ink = digits.render_digit(raw, size=96, margin=1 / 6, pen=True, dark_on_light=False)
    rgba = np.zeros((*ink.size[::-1], 4), dtype=np.uint8)
    rgba[..., :3] = (25, 25, 112)
    rgba[..., 3] = np.asarray(ink)
    return Image.fromarray(rgba, "RGBA")


SAMPLES = [
    Sample("sample.jpg", 2, "dark pen strokes on white, 128x128 JPEG", _pen, {"quality": 90}),
    Sample(
        "test.jpg",
        3,
        "dark pen strokes on white, slightly off-centre, 128x128 JPEG",
        lambda raw: _pen(raw, offset=(0.06, -0.04)),
        {"quality": 85},
    ),
    Sample("digit_0_0.png", 0, "dark pen strokes on white, 128x128", _pen, {}),
    Sample(
        "digit_7_0.png",
        7,
        "dark, smoothly upscaled (blurry) ink on white, 96x96",
        lambda raw: digits.render_digit(raw, size=80, margin=0.1),
        {},
    ),
    Sample(
        "digit_4_0.png",
        4,
        "light strokes on black (chalkboard style, like the data set), 128x128",
        lambda raw: _pen(raw, dark_on_light=False),
        {},
    ),
    Sample(
        "digit_9_0.png",
        9,
        "small dark digit in the corner of a large white 256x256 canvas",
        lambda raw: digits.render_digit(raw, size=96, margin=5 / 6, offset=(-0.2, 0.15), pen=True),
        {},
    ),
    Sample(
        "digit_5_0.png",
        5,
        "RGBA: navy strokes on a transparent background, 128x128",
        _transparent,
        {},
    ),
]


def _encode(img: Image.Image, name: str, options: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG" if name.endswith(".jpg") else "PNG", **options)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    data = digits.load_digits_split()
    cnn = digits.train("cnn", data=data).model
    mlp = digits.train("mlp", data=data).model
    spec = digits.input_spec()
    labels = data.y_test.numpy()

    rows = []
    for sample in SAMPLES:
        for index in np.flatnonzero(labels == sample.label):
            blob = _encode(sample.draw(data.raw_test[index]), sample.name, sample.save)
            x = preprocess_image(blob, spec)[None]
            with torch.inference_mode():
                probs = cnn(x).softmax(1)[0]
                mlp_label = int(mlp(x).argmax(1))
            if (
                int(probs.argmax()) == sample.label
                and float(probs[sample.label]) >= MIN_PROBABILITY
                and mlp_label == sample.label
            ):
                break
        else:
            raise SystemExit(f"no test image of label {sample.label} works for {sample.name}")
        (out / sample.name).write_bytes(blob)
        size = Image.open(io.BytesIO(blob)).size
        rows.append((sample, int(index), size, float(probs[sample.label])))
        print(
            f"{sample.name:15s} label {sample.label}  test index {index:3d}  "
            f"{size[0]}x{size[1]}  CNN p={float(probs[sample.label]):.3f}"
        )
    (out / "README.md").write_text(_readme(rows))
    print(f"wrote {len(rows)} images and README.md to {out}")


def _readme(rows: list[tuple[Sample, int, tuple[int, int], float]]) -> str:
    lines = [
        "# Sample inputs",
        "",
        "Held-out digits from scikit-learn's 8x8 digits data set (the TEST split of",
        "`torchship.zoo.digits.load_digits_split()`, never trained on), drawn as people",
        "send them. Generated by `.venv/bin/python scripts/make_data.py`; do not edit by hand.",
        "",
        "| file | label | test index | size | what it looks like |",
        "| --- | --- | --- | --- | --- |",
    ]
    for sample, index, size, _ in rows:
        lines.append(
            f"| `{sample.name}` | {sample.label} | {index} | {size[0]}x{size[1]} "
            f"| {sample.description} |"
        )
    lines += [
        "",
        "Each was checked when generated: the default digits CNN and MLP",
        "(`torchship.zoo.digits.train`) classify it as its label after",
        "`torchship.preprocessing.preprocess_image` with `digits.input_spec()`.",
        "",
        "Try one against a running server:",
        "",
        "```bash",
        'curl -F "image=@data/sample.jpg" http://127.0.0.1:8000/predict',
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

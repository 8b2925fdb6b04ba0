"""The naive endpoint, as a first tutorial writes it: the baseline of benchmarks/serving.py.

FastAPI with one ``async def /predict``; the model loaded with ``torch.load`` (a state
dict) into its class; per request: PIL decode, resize and normalise with NumPy, then one
model call under ``torch.no_grad()``, inline on the event loop. No batching, torch's
default thread count, uvicorn with 1 worker. It accepts what the benchmark sends:

* ``application/json`` ``{"inputs": [...]}`` shaped like one input (or a batch),
* ``multipart/form-data`` with the image in the field ``file``,
* a raw ``image/*`` body.

    python benchmarks/naive_fastapi.py --arch cnn --weights digits.pt --port 8000
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image, ImageOps

from torchship.zoo.digits import MEAN, STD, DigitsCNN
from torchship.zoo.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet18


def digits_preprocess(img: Image.Image) -> torch.Tensor:
    # The data set is light ink on dark; photos and drawings are dark on light.
    img = ImageOps.invert(img.convert("L")).resize((8, 8), Image.Resampling.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x)[None, None]


def imagenet_preprocess(img: Image.Image) -> torch.Tensor:
    img = img.convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)))
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


MODELS = {"cnn": (DigitsCNN, digits_preprocess), "resnet18": (ResNet18, imagenet_preprocess)}


def create_app(arch: str, weights: str) -> FastAPI:
    cls, preprocess = MODELS[arch]
    model = cls()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, object]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            x = torch.tensor((await request.json())["inputs"], dtype=torch.float32)
            if x.ndim == 3:
                x = x[None]
        else:
            if content_type.startswith("multipart/form-data"):
                form = await request.form()
                data = await form["file"].read()  # type: ignore[union-attr]
            else:
                data = await request.body()
            x = preprocess(Image.open(io.BytesIO(data)))
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)
        top = probs.topk(5, dim=1)
        return {
            "predictions": [
                {"label": str(int(i[0])), "probability": float(p[0]), "top_k": i.tolist()}
                for p, i in zip(top.values, top.indices, strict=True)
            ]
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--arch", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--weights", required=True, help="a state dict saved with torch.save")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = create_app(args.arch, args.weights)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()

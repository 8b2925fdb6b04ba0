"""The same models behind LitServe (Lightning AI), a peer row of benchmarks/serving.py.

Written as LitServe's documentation shows: a ``LitAPI`` whose ``setup`` loads the model
(a state dict, into its class), ``decode_request`` turns one request into a tensor
(PIL decode, resize and normalise with NumPy, as the naive server does),
``batch``/``predict``/``unbatch`` run a dynamic batch in eager PyTorch under
``torch.inference_mode()``, and ``encode_response`` returns the top-5. LitServe runs
``--workers`` inference processes, each here with ``--threads`` torch threads (one per
process on a small CPU, as torchship's ``--workers auto`` does), and batches up to
``--max-batch-size`` requests within ``--batch-timeout`` seconds.

It accepts ``application/json`` ``{"inputs": [...]}`` and ``multipart/form-data`` with
the image in the field ``file``. A raw ``image/*`` body has no route in LitServe, which
reads every request as JSON or a form, so the benchmark's raw-PNG workload skips it.

    python benchmarks/litserve_app.py --arch cnn --weights digits.pt --port 8000
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import litserve as ls
import torch
from naive_fastapi import MODELS
from PIL import Image


class TorchAPI(ls.LitAPI):
    def __init__(self, arch: str, weights: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arch, self.weights, self.threads = arch, weights, threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        cls, self.preprocess = MODELS[self.arch]
        self.model = cls()
        self.model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        self.model.eval()

    # unannotated on purpose: LitServe then parses the body as JSON or a form
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        if "inputs" in request:  # JSON
            x = torch.tensor(request["inputs"], dtype=torch.float32)
            return x if x.ndim == 4 else x[None]
        data = request["file"].file.read()  # a form: starlette's UploadFile
        return self.preprocess(Image.open(io.BytesIO(data)))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=1)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output.split(1))

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        top = output.topk(5, dim=1)
        return {
            "predictions": [
                {"label": str(int(i[0])), "probability": float(p[0]), "top_k": i.tolist()}
                for p, i in zip(top.values, top.indices, strict=True)
            ]
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--arch", choices=sorted(MODELS), required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="inference processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = parser.parse_args()
    api = TorchAPI(
        args.arch,
        args.weights,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()

"""Mixed precision: run the model under ``torch.autocast`` in bfloat16 or float16.

Autocast runs matrix multiplies and convolutions in the lower precision and keeps
precision-sensitive ops (softmax, norms, losses) in float32; the weights stay float32,
so the stored file is the parent's size. On a GPU with tensor cores this is the usual
first step. On a CPU it depends on the hardware, and :func:`cpu_half_support` says
which case this machine is:

* with AVX512-BF16 / AMX (recent Xeons) oneDNN has native bf16 kernels, but for small
  models the casts autocast inserts around every op cost more than they save;
* without them bf16 is *emulated* (converted to float32 for the arithmetic): slower.

Either way the report measures it rather than assuming a speed-up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchship.optimize._wrap import WrapperModule, build_base
from torchship.optimize.errors import MethodSkipped

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class Autocast(WrapperModule):
    """``base`` run under ``torch.autocast(device, dtype)``; outputs come back as float32."""

    def __init__(
        self, base: dict[str, Any], dtype: str = "bfloat16", *, _module: nn.Module | None = None
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"autocast dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.init_kwargs = {"base": base, "dtype": dtype}
        self.model = _module if _module is not None else build_base(base)
        self._dtype = DTYPES[dtype]
        self.eval()

    def forward(self, x: torch.Tensor) -> Any:
        with torch.autocast(device_type=x.device.type, dtype=self._dtype):
            out = self.model(x)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.float()
        return out


def _mkldnn_flag(name: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


def cpu_half_support(dtype: str) -> str:
    """A sentence on how this CPU runs ``dtype``, for the report's notes."""
    if dtype == "bfloat16":
        if _mkldnn_flag("_is_mkldnn_bf16_supported"):
            return (
                "this CPU has native bf16 instructions (AVX512-BF16/AMX), yet autocast adds "
                "a cast around every op: small models get slower, not faster"
            )
        return (
            "this CPU has no native bf16 instructions: bf16 is emulated (computed in "
            "float32 with conversions), so it is slower than float32 here"
        )
    if _mkldnn_flag("_is_mkldnn_fp16_supported"):
        return "this CPU has native fp16 instructions (AVX512-FP16/AMX-FP16)"
    return "this CPU has no native fp16 instructions: fp16 is emulated and slow here"


def check_autocast(device: torch.device, dtype: str) -> None:
    """Raise ``MethodSkipped`` when autocast to ``dtype`` does not work on ``device``."""
    if not torch.amp.is_autocast_available(device.type):
        raise MethodSkipped(f"torch has no autocast for {device.type}")
    probe = nn.Linear(4, 4).to(device)
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=DTYPES[dtype]):
            out = probe(torch.zeros(2, 4, device=device))
    except (RuntimeError, TypeError) as exc:
        raise MethodSkipped(f"{dtype} autocast is not supported on {device.type}: {exc}") from exc
    if out.dtype != DTYPES[dtype]:
        raise MethodSkipped(
            f"{dtype} autocast is not supported on {device.type} by this torch build "
            f"(Linear ran in {out.dtype})"
        )

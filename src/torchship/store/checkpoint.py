"""Training checkpoints that resume exactly: model, optimizer, scheduler, epoch, RNG state.

Each checkpoint is one ``torch.save`` file of tensors and plain containers, written
atomically and read back with ``weights_only=True``; an ``index.json`` records the
metric of each so the manager keeps the last N and the best K without reading them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from torchship.errors import InvalidInputError, ModelNotFoundError
from torchship.store._atomic import file_lock, fsync_dir, read_json, write_json_atomic
from torchship.store.serialization import safe_torch_load

INDEX = "index.json"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    file: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Resumed:
    """What :meth:`CheckpointManager.resume` restored."""

    step: int
    metrics: dict[str, float]
    extra: dict[str, Any]


def _rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Keep the last ``keep_last`` checkpoints plus the best ``keep_best`` by ``metric``.

    Use :meth:`save` at the end of each epoch (or step) and :meth:`resume` at start-up;
    resuming restores every RNG so a resumed run reaches the same weights as one that
    never stopped.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        keep_best: int = 1,
        metric: str | None = None,
        mode: Literal["min", "max"] = "min",
    ) -> None:
        if keep_last < 1:
            raise InvalidInputError("keep_last must be at least 1 (the resume point).")
        if keep_best and metric is None:
            keep_best = 0
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode

    # --- index --------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        """Kept checkpoints, oldest first."""
        raw = read_json(self.directory / INDEX, default={"checkpoints": []})
        return [CheckpointInfo(**c) for c in raw["checkpoints"]]

    def latest(self) -> CheckpointInfo | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self) -> CheckpointInfo | None:
        ranked = self._ranked(self.checkpoints())
        return ranked[0] if ranked else None

    def _ranked(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        if self.metric is None:
            return []
        scored = [c for c in infos if self.metric in c.metrics]
        return sorted(
            scored, key=lambda c: c.metrics[self.metric or ""], reverse=self.mode == "max"
        )

    # --- save / load --------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        *,
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write checkpoint ``step`` atomically, then prune what the policy does not keep."""
        self.directory.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        payload = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "metrics": metrics,
            "rng": _rng_state(),
            "extra": extra or {},
            "torch_version": str(torch.__version__),
        }
        info = CheckpointInfo(step=step, file=f"checkpoint-{step:08d}.pt", metrics=metrics)
        path = self.directory / info.file
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        fsync_dir(self.directory)
        with file_lock(self.directory / ".lock"):
            infos = [c for c in self.checkpoints() if c.step != step] + [info]
            infos.sort(key=lambda c: c.step)
            keep = {c.file for c in infos[-self.keep_last :]}
            keep |= {c.file for c in self._ranked(infos)[: self.keep_best]}
            kept = [c for c in infos if c.file in keep]
            write_json_atomic(
                self.directory / INDEX,
                {"checkpoints": [c.__dict__ for c in kept], "metric": self.metric},
            )
            for c in infos:
                if c.file not in keep:
                    (self.directory / c.file).unlink(missing_ok=True)
        return info

    def load(self, which: Literal["latest", "best"] | int = "latest") -> dict[str, Any]:
        """The raw checkpoint payload (tensors and plain containers only)."""
        info = self._find(which)
        return safe_torch_load(self.directory / info.file)  # type: ignore[no-any-return]

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        *,
        which: Literal["latest", "best"] | int = "latest",
        restore_rng: bool = True,
    ) -> Resumed | None:
        """Restore state in place; returns ``None`` when there is nothing to resume."""
        if not self.checkpoints():
            return None
        payload = self.load(which)
        model.load_state_dict(payload["model"])
        if optimizer is not None and payload["optimizer"] is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload["scheduler"] is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if restore_rng:
            _set_rng_state(payload["rng"])
        return Resumed(step=payload["step"], metrics=payload["metrics"], extra=payload["extra"])

    def _find(self, which: Literal["latest", "best"] | int) -> CheckpointInfo:
        infos = self.checkpoints()
        found: CheckpointInfo | None
        if which == "latest":
            found = infos[-1] if infos else None
        elif which == "best":
            found = self.best()
        else:
            found = next((c for c in infos if c.step == which), None)
        if found is None:
            raise ModelNotFoundError(
                f"No {which} checkpoint in {self.directory}.",
                hint=f"Kept steps: {[c.step for c in infos] or 'none'}.",
            )
        return found

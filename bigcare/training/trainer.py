"""The CARE trainer: plain PyTorch, Adam, reduce-on-plateau, best/last checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import UNet, save_model
from ..models.store import ModelConfig
from .losses import get_loss

__all__ = ["fit", "TrainResult"]


@dataclass
class TrainResult:
    """Losses per epoch and where the checkpoints went."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0
    model_dir: Path | None = None


def _to_tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


def fit(
    model: UNet,
    config: ModelConfig,
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    *,
    validation: Iterable[tuple[np.ndarray, np.ndarray]],
    epochs: int,
    steps_per_epoch: int,
    lr: float = 4e-4,
    loss: str = "mae",
    device: str = "cpu",
    model_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on a stream of batches; keep the best (validation) and last weights.

    Parameters
    ----------
    model : UNet
        The network to train (modified in place; the best weights are loaded at the end).
    config : ModelConfig
        Its config; saved with every checkpoint, provenance extended with the losses.
    batches : iterator of (x, y)
        Endless stream of normalised float32 batches, each (N, C, *spatial).
    validation : iterable of (x, y)
        Fixed validation batches.
    epochs, steps_per_epoch : int
        Training length.
    lr : float
        Adam learning rate (CARE: 4e-4); halved when the validation loss stalls for 10 epochs.
    loss : {"mae", "mse"}
    device : str
    model_dir : path, optional
        If given, ``model_dir/best`` and ``model_dir/last`` are written as model folders.
    seed : int
        Seeds torch for reproducible initial state of this call.
    progress : bool
        One progress bar per epoch.

    Returns
    -------
    TrainResult
    """
    torch.manual_seed(seed)
    loss_fn = get_loss(loss)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=10)
    validation = [(_to_tensor(x, device), _to_tensor(y, device)) for x, y in validation]
    first = config.architecture.heads[0].name
    result = TrainResult(model_dir=Path(model_dir) if model_dir else None)
    best, best_state = float("inf"), None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for _ in bar:
            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            value = loss_fn(model(_to_tensor(x, device))[first], _to_tensor(y, device))
            value.backward()
            optimizer.step()
            losses.append(value.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        model.eval()
        with torch.inference_mode():
            val = float(np.mean([float(loss_fn(model(x)[first], y)) for x, y in validation]))
        scheduler.step(val)
        result.train_loss.append(float(np.mean(losses)))
        result.val_loss.append(val)
        result.lr.append(optimizer.param_groups[0]["lr"])
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {result.train_loss[-1]:.4f}, val {val:.4f}, "
                  f"lr {result.lr[-1]:.2e}", flush=True)
        if val < best:
            best, result.best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _checkpoint(model, config, result, "best")
        _checkpoint(model, config, result, "last")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _checkpoint(model: UNet, config: ModelConfig, result: TrainResult, which: str) -> None:
    if result.model_dir is None:
        return
    provenance = dict(config.provenance)
    provenance["training"] = {"epochs": len(result.train_loss), "train_loss": result.train_loss,
                              "val_loss": result.val_loss, "lr": result.lr, "best_epoch": result.best_epoch}
    cfg = config.model_copy(update={"provenance": provenance})
    save_model(result.model_dir / which, model, cfg, overwrite=True)

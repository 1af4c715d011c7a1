"""The CARE trainer: plain PyTorch, Adam, reduce-on-plateau, best/last checkpoints, resume.

``model_dir`` after training::

    model_dir/
      best/            model folder (config.json + model.safetensors), lowest validation loss
      last/            model folder of the last epoch, plus its training state:
        training_state.json          epoch, history, scheduler, optimizer hyper-parameters
        training_state.safetensors   optimizer moments and torch's RNG state (never pickled)
      history.jsonl    one JSON line per epoch: train/val loss, lr, seconds
      loss_curves.png  train/validation loss and learning rate per epoch, redrawn each epoch
      tensorboard/     if asked for
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bigcare.errors import ConfigError, ModelError
from bigcare.models import UNet, load_model, save_model
from bigcare.models.folder import ModelConfig
from bigcare.training.losses import PROBABILISTIC, get_loss

__all__ = ["fit", "TrainResult", "close_stream"]

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"


def close_stream(batches: object) -> None:
    """Close a batch stream that training has finished with (a generator; anything else is left).

    A sampler's stream holds dask futures; closing it here drops them at a known point rather
    than in a garbage-collection finaliser inside some later, unrelated call of the client."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


@dataclass
class TrainResult:
    """Losses per epoch and where the checkpoints went."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = -1
    start_epoch: int = 0
    seconds: float = 0.0
    model_dir: Path | None = None
    members: list[TrainResult] = field(default_factory=list)  # an ensemble's (model_dir holds ensemble.json)

    @property
    def epochs(self) -> int:
        return len(self.train_loss)


def _to_tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device, non_blocking=True)


def _autocast(device: str, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


#: learning-rate factor of a detached scale head (``laplace_detach_scale``)
SCALE_HEAD_LR = 10.0


def fit(
    model: UNet,
    config: ModelConfig,
    batches: Iterator[tuple[np.ndarray, ...]],
    *,
    validation: Iterable[tuple[np.ndarray, ...]],
    epochs: int,
    steps_per_epoch: int,
    lr: float = 4e-4,
    lr_schedule: str = "plateau",
    loss: str = "mae",
    laplace_beta: float = 1.0,
    laplace_detach_scale: bool = True,
    device: str = "cpu",
    precision: str = "fp32",
    model_dir: str | Path | None = None,
    resume: bool = False,
    tensorboard: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on a stream of batches; keep the best (validation) and last weights.

    Parameters
    ----------
    model : UNet
        The network (modified in place; the best weights are loaded at the end).
    config : ModelConfig
        Its config, saved with every checkpoint; provenance gets the training history.
    batches : iterator of (x, y) or (x, y, mask)
        Endless stream of normalized float32 batches, each (N, C, *spatial); with a ``mask``
        (self-supervised training, :mod:`bigcare.training.blindspot`) the loss counts only the
        voxels where it is 1.
    validation : iterable of (x, y) or (x, y, mask)
        Fixed validation batches.
    epochs, steps_per_epoch : int
        Training length (total epochs, including those done before a resume).
    lr : float
        Adam learning rate (CARE: 4e-4); halved when the validation loss stalls for 10 epochs.
    lr_schedule : {"plateau", "cosine"}
        plateau: halve the learning rate after 10 epochs without a better validation loss (CSBDeep's);
        cosine: anneal it per step from ``lr`` to ``lr / 100`` over the whole run (resumes continue it).
    loss : {"mae", "mse", "laplace"}
        ``laplace`` (probabilistic CARE) trains the first head as the mean and the head of kind
        scale (the second, a softplus head) as the Laplace scale, by the negative log-likelihood.
    laplace_beta : float
        ``laplace`` only: the mean's gradient is ``sign(mu - y) * scale ** (laplace_beta - 1)``
        (:func:`bigcare.training.losses.laplace`): 1 the MAE's, 0 the plain NLL's. Losses
        reported (train and validation) are the plain NLL.
    laplace_detach_scale : bool
        ``laplace`` only: the scale head reads the network's last features detached, so its
        gradient trains the head alone and the network learns only from the mean's loss
        ("faithful" heteroscedastic regression, Stirn et al., AISTATS 2023). With
        ``laplace_beta=1`` the network then gets exactly plain CARE's MAE gradient. The head
        learns at ``lr * SCALE_HEAD_LR``.
    device : str
    precision : {"fp32", "bf16", "fp16"}
        Autocast precision of the forward pass (mixed precision; use bf16 on GPUs).
    model_dir : path, optional
        Where ``best/``, ``last/`` and ``history.jsonl`` go.
    resume : bool
        Continue from ``model_dir/last`` (weights, optimizer, scheduler, epoch) if present.
    tensorboard : bool
        Also write TensorBoard scalars to ``model_dir/tensorboard``.
    seed : int
        Seeds torch (initial state of this call, before a resume restores its own).
    progress : bool
        One progress bar and one summary line per epoch.

    Returns
    -------
    TrainResult
    """
    torch.manual_seed(seed)
    loss_fn = get_loss(loss)
    model.to(device)
    scale_head = _scale_head(config) if loss in PROBABILISTIC else None
    detached = scale_head is not None and laplace_detach_scale
    if detached:
        model.detach_heads = frozenset({scale_head})
        # Adam moves a weight by about lr per step: a head alone (a 1x1 conv) at CARE's lr cannot
        # travel from softplus(0) = 0.69 to scales of 1e-2 in a few thousand steps, nor track the
        # network's features as they change (measured: ECE 0.16, validation NLL still falling fast)
        head = [p for n, p in model.named_parameters() if n.startswith(f"heads.{scale_head}.")]
        rest = [p for n, p in model.named_parameters() if not n.startswith(f"heads.{scale_head}.")]
        groups: list[dict] = [{"params": rest}, {"params": head, "lr": lr * SCALE_HEAD_LR}]
        optimizer = torch.optim.Adam(groups, lr=lr)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler: Any  # ReduceLROnPlateau.step takes the metric, the others none
    if lr_schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=10)
    elif lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch,
                                                               eta_min=lr / 100)
    else:
        raise ConfigError(f"lr_schedule must be 'plateau' or 'cosine', got {lr_schedule!r}")
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and str(device).startswith("cuda"))
    val_batches = [tuple(_to_tensor(a, device) for a in batch) for batch in validation]
    first = config.architecture.heads[0].name

    def evaluate(out: dict, y: torch.Tensor, mask: list, beta: float = 0.0) -> torch.Tensor:  # value: the NLL
        extra = {} if scale_head is None else {"scale": out[scale_head].float(), "beta": beta}
        return loss_fn(out[first].float(), y, *mask, **extra)

    result = TrainResult(model_dir=Path(model_dir) if model_dir else None)
    if resume and result.model_dir is not None and (result.model_dir / "last" / STATE_JSON).exists():
        _resume(result, model, optimizer, scheduler, device)
    writer = _tensorboard(result.model_dir) if tensorboard else None
    best = min(result.val_loss) if result.val_loss else float("inf")
    best_state = None
    t0 = time.perf_counter()
    for epoch in range(result.start_epoch, epochs):
        t_epoch = time.perf_counter()
        model.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for _ in bar:
            x, y, *mask = (_to_tensor(a, device) for a in next(batches))
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                out = model(x)
            value = evaluate(out, y, mask, laplace_beta)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            if lr_schedule == "cosine":
                scheduler.step()
            losses.append(value.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        model.eval()
        with torch.inference_mode(), _autocast(device, precision):
            val = float(np.mean([evaluate(model(x), y, mask).item() for x, y, *mask in val_batches]))
        if lr_schedule == "plateau":
            scheduler.step(val)
        result.train_loss.append(float(np.mean(losses)))
        result.val_loss.append(val)
        result.lr.append(optimizer.param_groups[0]["lr"])
        record = {"epoch": epoch + 1, "train_loss": result.train_loss[-1], "val_loss": val,
                  "lr": result.lr[-1], "seconds": time.perf_counter() - t_epoch}
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {record['train_loss']:.4f}, val {val:.4f}, "
                  f"lr {record['lr']:.2e}, {record['seconds']:.1f} s", flush=True)
        if writer is not None:
            for key in ("train_loss", "val_loss", "lr"):
                writer.add_scalar(key, record[key], epoch + 1)
        if val < best:
            best, result.best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _save(result, model, config, "best")
        _save(result, model, config, "last", optimizer=optimizer, scheduler=scheduler, record=record)
        if result.model_dir is not None:  # 0.25 s per epoch for 100 epochs (0.9 s the first: matplotlib's import)
            from bigcare.training.curves import plot_curves

            plot_curves(result.model_dir, result.train_loss, result.val_loss, result.lr, result.best_epoch)
    if writer is not None:
        writer.close()
    close_stream(batches)
    if best_state is not None:
        model.load_state_dict(best_state)
    elif result.model_dir is not None and (result.model_dir / "best").exists():  # resumed, no better epoch
        model.load_state_dict(load_model(result.model_dir / "best", device=device)[0].state_dict())
    model.eval()
    model.detach_heads = frozenset()
    result.seconds = time.perf_counter() - t0
    return result


def _scale_head(config: ModelConfig) -> str:
    """The name of the softplus head a probabilistic loss trains as the Laplace scale."""
    heads = config.architecture.heads
    scales = [h.name for h in heads[1:] if h.activation in ("softplus", "softplus_eps")]
    if not scales:
        raise ConfigError(f"a probabilistic loss needs a scale head (activation softplus or softplus_eps) after "
                          f"the mean; the network has heads {[h.name for h in heads]}")
    return scales[0]


def _tensorboard(model_dir: Path | None):
    if model_dir is None:
        raise ConfigError("tensorboard logging needs a model_dir")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("training.tensorboard is true but the tensorboard package is not installed "
                          "(pip install tensorboard)") from None
    return SummaryWriter(str(model_dir / "tensorboard"))


def _history(result: TrainResult) -> dict:
    return {"epochs": result.epochs, "train_loss": result.train_loss, "val_loss": result.val_loss,
            "lr": result.lr, "best_epoch": result.best_epoch + 1}


def _save(result: TrainResult, model: UNet, config: ModelConfig, which: str, *,
          optimizer=None, scheduler=None, record=None) -> None:
    if result.model_dir is None:
        return
    provenance = dict(config.provenance, training=_history(result))
    folder = save_model(result.model_dir / which, model, config.model_copy(update={"provenance": provenance}),
                        overwrite=True)
    if optimizer is None:
        return
    tensors, groups = {"rng": torch.get_rng_state()}, []
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for group in optimizer.state_dict()["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    save_file(tensors, str(folder / STATE_TENSORS))
    state = {"epoch": len(result.train_loss), "history": _history(result), "param_groups": groups,
             "scheduler": scheduler.state_dict()}
    (folder / STATE_JSON).write_text(json.dumps(state))
    with open(result.model_dir / "history.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")


def _resume(result: TrainResult, model: UNet, optimizer, scheduler, device) -> None:
    """Load weights, optimizer, scheduler and history from ``model_dir/last``."""
    assert result.model_dir is not None  # resuming needs a model folder
    folder = result.model_dir / "last"
    try:
        state = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
        weights, saved_config = load_model(folder, device=device)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot resume from {folder}: {type(e).__name__}: {e}") from None
    if saved_config.architecture != model.config:
        raise ModelError(f"cannot resume from {folder}: its architecture differs from the configured one; "
                         "use another model_dir or set training.resume to false")
    model.load_state_dict(weights.state_dict())
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng"])
    history = state["history"]
    result.train_loss, result.val_loss, result.lr = history["train_loss"], history["val_loss"], history["lr"]
    result.best_epoch = history["best_epoch"] - 1
    result.start_epoch = state["epoch"]

"""Console lines and the optional experiment loggers (trackio, wandb, tensorboard).

The console line follows the public speculators style (its fields; the time, level and
`file:line` come from `speculators.console`):
`train/loss_0=1.980, train/full_acc_0=0.029, ..., train/loss=5.965, epoch=0, lr=2.47e-05`.
The optional loggers are imported only when chosen and give a clear error when their
package is missing; they get every metric key under `<prefix>/`.
"""

from __future__ import annotations

import logging
from typing import Any

from speculators.console import format_fields
from speculators.errors import UserError

logger = logging.getLogger("speculators.train")

LOGGER_PACKAGES = {"trackio": "trackio", "wandb": "wandb", "tensorboard": "tensorboard"}


def metrics_line(prefix: str, metrics: dict[str, float], epoch: int, lr: float | None = None) -> str:
    """`<prefix>/<key>=<value>, ..., epoch=<epoch>[, lr=<lr>]` in the metrics' own order."""
    fields: dict[str, Any] = {f"{prefix}/{k}": v for k, v in metrics.items() if k != "lr"}
    fields["epoch"] = epoch
    if lr is not None:
        fields["lr"] = lr
    return format_fields(fields)


class ExperimentLogger:
    """Thin adapter over one optional backend; `log(prefix, metrics, step)`."""

    def __init__(self, kind: str | None, log_dir: str, run_name: str, config: dict[str, Any]):
        self.kind = kind
        self._backend = None
        if kind is None:
            return
        pkg = LOGGER_PACKAGES.get(kind)
        if pkg is None:
            raise UserError(f"--logger {kind!r}: choose one of {', '.join(LOGGER_PACKAGES)}")
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._backend = SummaryWriter(log_dir=f"{log_dir}/{run_name}")
            elif kind == "wandb":
                import wandb

                self._backend = wandb.init(project="speculators", name=run_name, dir=log_dir, config=config)
            else:
                import trackio

                trackio.init(project="speculators", name=run_name, config=config)
                self._backend = trackio
        except ImportError as exc:
            raise UserError(
                f"--logger {kind}: the package {pkg!r} is not installed; `pip install {pkg}` or drop --logger"
            ) from exc

    def log(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        if self._backend is None:
            return
        if self.kind == "tensorboard":
            for k, v in metrics.items():
                self._backend.add_scalar(f"{prefix}/{k}", v, step)
        else:
            self._backend.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self._backend is None:
            return
        if self.kind == "tensorboard":
            self._backend.close()
        else:
            self._backend.finish()
        self._backend = None

"""Small callbacks on one vocabulary of events (fastai's): before_fit, before_epoch, after_batch,
after_epoch, after_fit. Each sees the ``Fit`` state object and may set ``fit.stop``."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fovea.errors import FoveaError

if TYPE_CHECKING:
    from fovea.training._loop import Fit

log = logging.getLogger("fovea.training")
HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "seconds"]


class Callback:
    def before_fit(self, fit: Fit) -> None: ...
    def before_epoch(self, fit: Fit) -> None: ...
    def after_batch(self, fit: Fit) -> None: ...
    def after_epoch(self, fit: Fit) -> None: ...
    def after_fit(self, fit: Fit) -> None: ...


class ProgressBar(Callback):
    """A rich progress bar per epoch with loss, accuracy and images/s; one summary line per epoch."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress: Any = None

    def before_epoch(self, fit: Fit) -> None:
        from rich.console import Console

        if not self.enabled or not Console(stderr=True).is_terminal:  # logs and pipes get the epoch lines only
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn(f"epoch {fit.epoch + 1}/{fit.cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} {task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(), transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=fit.steps_per_epoch, loss=math.nan, acc=math.nan, ips=0.0)

    def after_batch(self, fit: Fit) -> None:
        if self.progress is not None:
            r = fit.running  # refreshed every 10th step (reading it syncs the GPU); empty before that
            self.progress.update(self.task, advance=1, loss=r.get("loss", math.nan), acc=r.get("acc", math.nan),
                                 ips=r.get("seen", 0) / max(time.perf_counter() - fit.epoch_start, 1e-9))

    def after_epoch(self, fit: Fit) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        row = fit.history[-1]
        if self.enabled:
            from rich.console import Console

            Console(stderr=True).print(
                f"epoch {row['epoch']:>3}/{fit.cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.3f}  "
                f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}  "
                f"{row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s" + ("  *" if fit.best_epoch == row["epoch"] else ""),
                highlight=False, soft_wrap=True,
            )

    def after_fit(self, fit: Fit) -> None:
        if self.progress is not None:
            self.progress.stop()


class CSVLogger(Callback):
    """history.csv, rewritten from the in-memory history each epoch (so a resumed run has every row once)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_epoch(self, fit: Fit) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(fit.history)
        tmp.replace(self.path)


class BestTracker(Callback):
    """Keeps the best weights by ``cfg.monitor``; stops after ``patience`` epochs without improvement."""

    def __init__(self, monitor: str, patience: int | None) -> None:
        self.monitor, self.patience = monitor, patience

    def _better(self, new: float, old: float | None) -> bool:
        if old is None:
            return True
        return new > old if self.monitor in ("val_acc", "last") else new < old

    def after_epoch(self, fit: Fit) -> None:
        # "last" keeps the final weights: the epoch number always improves.
        score = fit.history[-1]["epoch" if self.monitor == "last" else self.monitor]
        if self._better(score, fit.best_score):
            fit.best_score, fit.best_epoch = score, fit.history[-1]["epoch"]
            fit.best_state = {k: v.detach().clone() for k, v in fit.model.state_dict().items()}
        elif self.patience is not None and fit.history[-1]["epoch"] - fit.best_epoch >= self.patience:
            log.info("early stopping: no %s improvement for %d epochs (best %.4f at epoch %d)",
                     self.monitor, self.patience, fit.best_score, fit.best_epoch)
            fit.stop = True


class Checkpointer(Callback):
    """A checkpoint after every epoch (model, optimizer, RNGs, history, best weights).

    Tensors are copied to host memory at once; the files are written on a background thread while the
    next epoch trains (resnet50 + momentum is ~200 MB: writing it inline cost ~0.4 s per epoch on the H200).
    """

    def __init__(self) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending: Future[None] | None = None
        self.seconds = {"checkpoint_copy": 0.0, "checkpoint_wait": 0.0}  # time the training thread spent

    def _wait(self) -> None:
        if self.pending is not None:
            t0 = time.perf_counter()
            try:
                self.pending.result()  # re-raises a failed write here, in the training thread
            except OSError as e:
                raise FoveaError(f"could not write a checkpoint ({e}); free some disk space, then add --resume") from e
            finally:
                self.pending = None
            self.seconds["checkpoint_wait"] += time.perf_counter() - t0

    def before_fit(self, fit: Fit) -> None:
        # A resumed run's newest checkpoint on disk holds the best weights (as model or best file).
        self.on_disk_epoch = fit.epoch if fit.epoch > 0 else None

    def after_epoch(self, fit: Fit) -> None:
        from fovea.training._checkpoint import save_checkpoint, snapshot

        self._wait()
        t0 = time.perf_counter()
        epoch = fit.epoch + 1
        # The best weights need copying only if no checkpoint on disk has them: when they are this
        # epoch's (then they are model.safetensors) or in the previous checkpoint, they are linked.
        linked = fit.best_epoch == epoch or (self.on_disk_epoch is not None and 0 < fit.best_epoch <= self.on_disk_epoch)
        snap = snapshot(model=fit.model, optimizer=fit.opt, generator=fit.generator,
                        best=None if linked else fit.best_state)
        state = {"epoch": epoch, "step": fit.step, "history": [dict(r) for r in fit.history],
                 "best_score": fit.best_score, "best_epoch": fit.best_epoch, "stopped": fit.stop}
        self.pending = self.pool.submit(save_checkpoint, fit.run, snap, state)
        self.on_disk_epoch = epoch
        self.seconds["checkpoint_copy"] += time.perf_counter() - t0

    def after_fit(self, fit: Fit) -> None:
        self._wait()
        self.pool.shutdown()

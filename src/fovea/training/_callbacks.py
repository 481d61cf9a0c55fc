"""Small callbacks on one vocabulary of events (fastai's): before_fit, before_epoch, after_batch,
after_epoch, after_fit. Each sees the ``Fit`` state object and may set ``fit.stop``."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

from fovea.errors import FoveaError
from fovea.training._fit import Callback, Fit

log = logging.getLogger("fovea.training")
HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "grad_norm", "grad_norm_max",
                  "images_per_s", "seconds"]


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


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """history.csv from ``rows``, written whole and then moved into place (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


class CSVLogger(Callback):
    """history.csv, rewritten from the in-memory history each epoch (so a resumed run has every row once)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_epoch(self, fit: Fit) -> None:
        write_history(self.path, fit.history)


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


class TimeBudget(Callback):
    """Fits the run into a time budget: the number of epochs follows the speed measured on this machine.

    After a few warm-up steps (allocation and oneDNN/cuDNN kernel selection make the first steps slow) it times
    the training steps and plans how many epochs fit before ``deadline``, leaving what the end of the run needs
    (the final evaluation with TTA, the training-set evaluation, the drift reference, the report: ``finish``
    estimates it from the measured validation speed). After every epoch it plans again from the epochs' own
    times, so a machine that slows down shortens the run instead of overrunning it. The schedule is a function
    of (step, total steps), so the one-cycle schedule ends on time instead of being cut off (Ultralytics'
    ``time=`` re-plans the same way). ``cap``: at most this many epochs (None: as many as fit).
    """

    WARMUP_STEPS = 3
    MEASURE_SECONDS = 5.0  # the first plan: after this long (or the first epoch, if shorter)

    def __init__(self, deadline: float, cap: int | None, finish: Any, on_plan: Any = None,
                 clock: Any = time.monotonic) -> None:
        self.deadline, self.cap, self.clock = deadline, cap, clock  # ``deadline`` on ``clock``
        self.finish = finish  # (fit, seconds per image of a forward pass) -> seconds the end of the run takes
        self.on_plan = on_plan  # (fit) -> None: called when the plan changes (train_config.json is rewritten)
        self.planned = False
        self._t0: float | None = None
        self._steps0 = 0
        self._last = 0.0
        self._epochs: list[float] = []  # wall seconds of each epoch, callbacks (checkpoints) included

    def before_fit(self, fit: Fit) -> None:
        self._last = self.clock()

    def _apply(self, fit: Fit, total: int, why: str) -> None:
        total = max(1, len(fit.history), total if self.cap is None else min(total, self.cap))  # never below what ran
        if self.planned and total == fit.cfg.epochs:
            return
        self.planned = True
        log.info("time budget: %d epochs (%s)", total, why)
        fit.cfg.epochs = total
        if self.on_plan:
            self.on_plan(fit)

    def after_batch(self, fit: Fit) -> None:
        done = fit.step - fit.epoch * fit.steps_per_epoch  # steps taken in this epoch
        if self.planned or fit.epoch > 0:
            return
        if done == self.WARMUP_STEPS:
            self._t0, self._steps0 = self.clock(), fit.step
            return
        if self._t0 is None or fit.step - self._steps0 < 2:
            return
        elapsed = self.clock() - self._t0
        if elapsed < self.MEASURE_SECONDS:
            return
        step_s = elapsed / (fit.step - self._steps0)
        batch = max(int(fit.cfg.batch_size or 1), 1)
        fwd_per_image = step_s / batch / 3  # a forward pass costs about a third of a training step
        val_s = fwd_per_image * len(fit.val)
        epoch_s = fit.steps_per_epoch * step_s + val_s
        rest_of_this_epoch = (fit.steps_per_epoch - done) * step_s + val_s
        left = self.deadline - self.clock() - self.finish(fit, fwd_per_image) - rest_of_this_epoch
        self._apply(fit, 1 + int(max(left, 0.0) // epoch_s),
                    f"{epoch_s:.1f} s per epoch expected from the first {fit.step - self._steps0} steps")

    def after_epoch(self, fit: Fit) -> None:
        now = self.clock()
        self._epochs.append(now - self._last)
        self._last = now
        recent = (self._epochs[1:] if len(self._epochs) > 1 else self._epochs)[-3:]  # the first holds the warm-up
        epoch_s = sum(recent) / len(recent)
        fwd_per_image = fit.val_seconds / max(len(fit.val), 1) if fit.val_seconds else 0.0
        left = self.deadline - now - self.finish(fit, fwd_per_image)
        total = len(fit.history) + int(max(left, 0.0) // epoch_s)
        # Changing the plan moves the schedule a little: only when it would overrun, or could run notably longer.
        current = int(fit.cfg.epochs or 1)
        if self.planned and len(fit.history) < current and total <= len(fit.history):
            # Stopping now would end on an epoch that ran on the longer plan's schedule, its learning rate still
            # high: keep one more epoch, in which the shortened one-cycle schedule anneals to its end (a run
            # that has no plan yet has only its first epoch behind it, and stops: a tiny budget trains one).
            total = len(fit.history) + 1
        if not self.planned or total < current or (total > current + 1 and len(fit.history) < current / 2):
            self._apply(fit, total, f"{epoch_s:.1f} s per epoch measured, {max(left, 0.0):.0f} s left for epochs")

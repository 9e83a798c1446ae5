"""Keep the local CSV metric history exact across resumes: no gaps, no repeated rows.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, and a job killed between
checkpoints has already written rows for steps that the resumed run logs again. ``ResumableCSVLogger``
keeps the file; ``CSVHistoryCallback`` then drops the rows the restored checkpoint does not contain.
A row logged while global step was s belongs to the checkpoints taken at steps > s.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger that appends to the ``metrics.csv`` it finds instead of deleting it."""

    @property
    def experiment(self):  # type: ignore[override]
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            saved = path.read_bytes() if path.is_file() else None
            writer = CSVLogger.experiment.fget(self)
            if saved is not None:
                path.write_bytes(saved)
                writer.metrics_keys = sorted(next(csv.reader(io.StringIO(saved.decode("utf-8"))), []))
        return self._experiment


class CSVHistoryCallback(L.Callback):
    """At train start (after Lightning restored the loops), keeps only the CSV rows logged before the restored global step (all of them when
    starting fresh in a reused folder are dropped, since the fresh run starts at step 0)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                path = Path(logger.experiment.metrics_file_path)
                if path.is_file():
                    keep_rows_before_step(path, trainer.global_step)


def keep_rows_before_step(path: Path, step: int) -> None:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
        header = list(rows[0].keys()) if rows else []
    kept = [row for row in rows if row.get("step") not in (None, "") and int(float(row["step"])) < step]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue())
    tmp.replace(path)

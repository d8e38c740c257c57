"""Checkpoints that survive faults, and runs whose metrics cover every resumed segment.

The HF Trainer writes a checkpoint in place, so a full disk or a kill during a save leaves a partial newest
`checkpoint-N` that `--resume` then fails on, and a resumed run reports only its last segment. `MoeLoraTrainer`
writes each checkpoint into a hidden folder and renames it when complete, keeps the run's totals in it, and
`last_complete_checkpoint` skips whatever a crash left half-written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

if TYPE_CHECKING:
    from .training import MoeLoraCallback


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the checkpoints saved before it are intact."""


#: The run's totals up to a checkpoint (`RunProgress`), saved in the checkpoint.
PROGRESS_NAME = "moelora_progress.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # the names transformers resumes from
#: Where a checkpoint is written before it is renamed to `checkpoint-N`: hidden, and not a name that
#: transformers' `get_last_checkpoint` or checkpoint rotation would pick up.
STAGING_PREFIX = f".tmp-{PREFIX_CHECKPOINT_DIR}-"
#: A checkpoint holds model weights and optimizer state in one of the Trainer's layouts (plain, FSDP, DeepSpeed).
_NEEDED = {
    "model weights": ("adapter_model.*", "model.safetensors", "pytorch_model*", "global_step*"),
    "optimizer state": ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*"),
}


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete.

    moelora's checkpoints appear only once complete (`MoeLoraTrainer`), but one written by an older moelora or cut
    short by a crash may lack files or hold a truncated one. The Trainer writes trainer_state.json last; weights and
    optimizer state must be there too, and every safetensors or torch file must be whole: safetensors checks that
    its header covers the file exactly, a torch zip file ends with its directory (neither loads any tensor).
    """
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except FileNotFoundError:
        return f"{TRAINER_STATE_NAME} missing"
    except (OSError, ValueError):
        return f"{TRAINER_STATE_NAME} unreadable"
    entries = sorted(folder.iterdir())
    for what, patterns in _NEEDED.items():
        if not any(fnmatch(entry.name, pattern) for entry in entries for pattern in patterns):
            return f"no {what}"
    for entry in entries:
        if entry.suffix == ".safetensors":
            try:
                with safe_open(entry, "pt"):
                    pass
            except Exception:  # SafetensorError (a bad header) or OSError
                return f"{entry.name} cut short"
        elif entry.suffix in (".pt", ".pth", ".bin") and entry.is_file() and not zipfile.is_zipfile(entry):
            return f"{entry.name} cut short"
    return None


def _numbered_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The `checkpoint-N` folders in `output_dir` with their step, newest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))]
    return sorted((step, path) for step, path in found if path.is_dir())[::-1]


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint in `output_dir` (see `checkpoint_problem`), or None.

    transformers' `get_last_checkpoint` takes the highest `checkpoint-N`, whole or not, so a save cut short by a
    full disk or a kill made `--resume` fail instead of continuing from the checkpoint before it.
    """
    return next((str(path) for _, path in _numbered_checkpoints(output_dir) if checkpoint_problem(path) is None), None)


def skipped_checkpoints(output_dir: Path, resumed: str | None) -> str:
    """The incomplete checkpoints newer than `resumed`, for the line that says where a run continues."""
    newest_complete = int(_CHECKPOINT_NAME.match(Path(resumed).name)[1]) if resumed else -1
    newer = [path for step, path in _numbered_checkpoints(output_dir) if step > newest_complete]
    skipped = [f"{path.name} ({checkpoint_problem(path)})" for path in newer]
    return f"; skipped incomplete {', '.join(skipped)}" if skipped else ""


@dataclass
class RunProgress:
    """What the run did up to a checkpoint, saved in it: a resumed run adds this segment to it and so reports the
    whole run (what an interrupted segment did after the checkpoint is redone, so it is not counted).

    `loss_sum` is the sum of the per-step training losses, as the Trainer accumulates it for `train_loss`."""

    global_step: int = 0
    train_runtime: float = 0.0
    loss_sum: float = 0.0
    tokens_seen: int = 0

    @classmethod
    def read(cls, checkpoint: str | None) -> RunProgress:
        """The progress saved in `checkpoint`; none (zeros) for a new run or a checkpoint of an older moelora."""
        path = Path(checkpoint or "", PROGRESS_NAME)
        return cls(**json.loads(path.read_text())) if checkpoint and path.is_file() else cls()


class ResumableTensorBoardCallback(TensorBoardCallback):
    """TensorBoard logging that continues a resumed run's own log folder and hides what the interrupted segment
    logged after the checkpoint (the steps it redoes): TensorBoard then shows each step once. The plain callback
    starts a new `runs/<time>` folder per segment, where the redone steps appeared twice."""

    def __init__(self) -> None:
        super().__init__()
        self.purge_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.is_world_process_zero:
            self.purge_step = state.global_step + 1  # the checkpoint's own step was logged before its save
            if self.logging_dir is None:  # TENSORBOARD_LOGGING_DIR unset: the default runs/<time> folders
                earlier = [path for path in Path(args.output_dir, "runs").glob("*") if path.is_dir()]
                self.logging_dir = str(max(earlier, key=lambda path: path.stat().st_mtime)) if earlier else None
        super().on_train_begin(args, state, control, **kwargs)

    def _init_summary_writer(self, args):
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_step)


class MoeLoraTrainer(Trainer):
    """A Trainer whose checkpoints survive faults and whose metrics cover the whole run across resumes.

    - A checkpoint is written into a hidden folder and renamed to `checkpoint-N` once complete (a rename within
      a filesystem is atomic): a full disk or a kill during a save leaves no partial `checkpoint-N`, and the
      rotation of old checkpoints (`save_total_limit`) runs only once the new one is complete.
    - Each checkpoint holds the run's `RunProgress`; `train()` reads it back when resuming, and the final metrics
      (`train_runtime`, `train_loss`, the speeds) count the earlier segments too.
    - A run resumed from a checkpoint at `max_steps` (stopped after its last save) trains no further step;
      transformers would run one more.

    `monitor` counts this segment's tokens and losses. Only `_save_checkpoint`, `_get_output_dir` and `_run_epoch`
    of the Trainer's internals are overridden (present since transformers 5.0); the totals come from the monitor.
    """

    def __init__(self, *args: Any, monitor: MoeLoraCallback, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor
        self.resumed = RunProgress()
        self._started = time.time()
        self._staging: Path | None = None
        handler = self.callback_handler
        handler.callbacks = [
            ResumableTensorBoardCallback() if type(callback) is TensorBoardCallback else callback
            for callback in handler.callbacks
        ]

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        self._started = time.time()
        self.resumed = RunProgress.read(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def progress(self) -> RunProgress:
        """The run's totals now: this segment's added to those of the checkpoint it resumed from."""
        return RunProgress(
            global_step=self.state.global_step,
            train_runtime=self.resumed.train_runtime + time.time() - self._started,
            loss_sum=self.resumed.loss_sum + self.monitor.loss_sum,
            tokens_seen=self.resumed.tokens_seen + self.monitor.tokens_seen,
        )

    def whole_run_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The Trainer's final metrics (of this segment) with runtime, loss and speeds of the whole run; the last
        entry of the log history, which holds them too, is updated alike."""
        progress = self.progress()
        steps, runtime = progress.global_step, max(progress.train_runtime, 1e-9)
        whole = {
            "train_runtime": progress.train_runtime,
            "train_loss": progress.loss_sum / steps if steps else math.nan,
            "train_steps_per_second": steps / runtime,
            "train_samples_per_second": steps * self.args.train_batch_size * self.args.gradient_accumulation_steps
            * self.args.world_size / runtime,
        }  # fmt: skip
        if self.state.log_history and "train_runtime" in self.state.log_history[-1]:
            self.state.log_history[-1].update(whole)
        return {**metrics, **whole}

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the Trainer writes it into the staging folder (`_save_checkpoint`).
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Saves into a hidden folder, renames it to `checkpoint-N` once complete, then rotates old checkpoints."""
        run_dir = Path(self._get_output_dir(trial))
        step = self.state.global_step
        final, staging = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}", run_dir / f"{STAGING_PREFIX}{step}"
        if self.args.should_save:
            for stale in run_dir.glob(f"{STAGING_PREFIX}*"):  # left by a crash or a kill during a save
                shutil.rmtree(stale)
        self.accelerator.wait_for_everyone()  # no process writes into a folder that is being removed
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)  # into staging/checkpoint-N, the only checkpoint it rotates
            self._staging = None
            self.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are in
            if self.args.should_save:
                self._publish(staging / final.name, final)
        except Exception as error:  # a full disk: RuntimeError from torch, SafetensorError, OSError from the rest
            self._staging = None
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # frees what the partial save took
            kept = last_complete_checkpoint(run_dir)
            kept = f"{kept} is intact and --resume continues from it" if kept else "no earlier checkpoint was saved"
            raise CheckpointSaveError(
                f"{final}: saving the checkpoint failed ({type(error).__name__}: {error}); {kept}"
            ) from error
        if self.args.should_save:
            rotate_checkpoints(
                str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )

    def _publish(self, staged: Path, final: Path) -> None:
        """Completes the staged checkpoint (the run's progress, the best checkpoint's final path), then renames it:
        within one filesystem the rename is atomic, so `final` appears whole or not at all."""
        if self.state.best_model_checkpoint == str(staged):
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        (staged / PROGRESS_NAME).write_text(json.dumps(dataclasses.asdict(self.progress())))
        if final.exists():  # an incomplete one (an older moelora's, a crash's), which resuming skipped
            shutil.rmtree(final)
        staged.rename(final)
        staged.parent.rmdir()

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        if self.state.global_step >= self.state.max_steps:
            return  # resumed from a checkpoint at max_steps: transformers' loop would run one more step
        super()._run_epoch(*args, **kwargs)

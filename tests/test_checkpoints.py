"""Checkpoints that survive faults, on a tiny random Llama: a checkpoint appears only once complete, `--resume`
continues from the newest complete one and says which, a full disk or a kill during a save loses at most one save
interval and never the checkpoint before, metrics and logs cover the whole run, a finished run is not resumed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_training import FailAt, load, make_config
from transformers import Trainer

from moelora.checkpoints import PROGRESS_NAME, CheckpointSaveError, checkpoint_problem, last_complete_checkpoint
from moelora.training import TrainingFinished, train

#: No evaluation, so each run is a few fast optimizer steps.
FAST = {"eval_steps": 100, "load_best_model_at_end": False}


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def logged_steps(run: Path) -> list[int]:
    return [entry["step"] for entry in json.loads((run / "train_log.json").read_text()) if "loss" in entry]


def test_a_checkpoint_becomes_visible_only_once_complete(tmp_path, tiny_model_dir, monkeypatch):
    run = tmp_path / "run"
    writes = []
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def spy(self, output_dir):  # the middle of a save: the weights are written, the optimizer state is not yet
        writes.append((Path(output_dir), (run / f"checkpoint-{self.state.global_step}").exists()))
        save_optimizer(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", spy)
    train(make_config(run, max_steps=2, save_steps=1, eval_steps=1), *load(tiny_model_dir))
    assert [visible for _, visible in writes] == [False, False]
    assert all(folder.parent.parent == run and folder.parent.name.startswith(".") for folder, _ in writes)
    assert sorted(path.name for path in run.iterdir() if "checkpoint" in path.name) == ["checkpoint-1", "checkpoint-2"]
    assert last_complete_checkpoint(run) == str(run / "checkpoint-2")
    progress = json.loads((run / "checkpoint-2" / PROGRESS_NAME).read_text())
    assert progress["global_step"] == 2 and progress["tokens_seen"] > 0
    best = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert Path(best).parent == run and Path(best).is_dir()  # where the checkpoint is, not where it was written


def test_incomplete_checkpoints_are_told_apart(tmp_path):
    def checkpoint(name: str, **damage) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "trainer_state.json").write_text(damage.get("state", '{"global_step": 1}'))
        save_file({"w": torch.ones(64)}, folder / "adapter_model.safetensors")
        torch.save({"state": torch.ones(64)}, folder / "optimizer.pt")
        for name in damage.get("delete", ()):
            (folder / name).unlink()
        for name in damage.get("truncate", ()):
            (folder / name).write_bytes((folder / name).read_bytes()[:-10])
        return folder

    assert last_complete_checkpoint(tmp_path) is None and last_complete_checkpoint(tmp_path / "absent") is None
    assert checkpoint_problem(checkpoint("checkpoint-1")) is None
    problems = {
        "checkpoint-2": ("trainer_state.json missing", {"delete": ["trainer_state.json"]}),
        "checkpoint-3": ("trainer_state.json unreadable", {"state": '{"global_step": '}),
        "checkpoint-4": ("no model weights", {"delete": ["adapter_model.safetensors"]}),
        "checkpoint-5": ("no optimizer state", {"delete": ["optimizer.pt"]}),
        "checkpoint-6": ("adapter_model.safetensors cut short", {"truncate": ["adapter_model.safetensors"]}),
        "checkpoint-7": ("optimizer.pt cut short", {"truncate": ["optimizer.pt"]}),
    }
    for name, (problem, damage) in problems.items():
        assert checkpoint_problem(checkpoint(name, **damage)) == problem, name
    checkpoint(".tmp-checkpoint-9")  # a save in progress, or one a crash left: never resumed from
    checkpoint("checkpoint-final")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")


def _fill_the_disk(monkeypatch, run: Path, step: int) -> dict[str, dict[str, bytes]]:
    """From the save of checkpoint-`step` on, writing the optimizer state fails as on a full disk, after part of
    the file was written. Returns the files of the previous checkpoint as they were when the disk filled."""
    save = torch.save
    before: dict[str, dict[str, bytes]] = {}

    def full_disk(obj, f, *args, **kwargs):
        path = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if path is not None and path.name == "optimizer.pt" and path.parent.name == f"checkpoint-{step}":
            before["previous"] = files_of(run / f"checkpoint-{step - 1}")
            path.write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    return before


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_resume_finishes(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    run = tmp_path / "run"
    config = make_config(run, max_steps=3, save_steps=1, save_total_limit=1, **FAST)
    before = _fill_the_disk(monkeypatch, run, step=2)
    with pytest.raises(CheckpointSaveError) as failure:
        train(config, *load(tiny_model_dir))
    assert isinstance(failure.value, OSError)
    assert str(failure.value) == (
        f"{run / 'checkpoint-2'}: saving the checkpoint failed (OSError: [Errno {errno.ENOSPC}] No space left on "
        f"device); {run / 'checkpoint-1'} is intact and --resume continues from it"
    )
    assert files_of(run / "checkpoint-1") == before["previous"]  # the failed save neither rotated nor touched it
    assert not (run / "checkpoint-2").exists() and not list(run.glob(".tmp-*"))
    monkeypatch.undo()  # the disk has room again
    capsys.readouterr()
    result = train(config, *load(tiny_model_dir), resume=True)
    assert f"{run}: resuming from checkpoint-1\n" in capsys.readouterr().out
    assert result.metrics["global_step"] == 3 and logged_steps(run) == [1, 2, 3]
    assert [path.name for path in run.glob("checkpoint-*")] == ["checkpoint-3"]  # save_total_limit=1, once complete


KILLED_DURING_A_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_training import load, make_config
from moelora.training import train

save = torch.save

def killed(obj, f, *args, **kwargs):  # SIGKILL halfway through the optimizer state of checkpoint-2
    if isinstance(f, str) and f.endswith("optimizer.pt") and Path(f).parent.name == "checkpoint-2":
        Path(f).write_bytes(b"PK partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)

torch.save = killed
train(make_config({run!r}, max_steps=3, save_steps=1, eval_steps=100, load_best_model_at_end=False),
      *load({model!r}))
"""


def test_a_kill_during_a_save_loses_at_most_one_save_interval(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    script = KILLED_DURING_A_SAVE.format(tests=str(Path(__file__).parent), run=str(run), model=str(tiny_model_dir))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run / "checkpoint-2").exists() and (run / ".tmp-checkpoint-2").is_dir()
    assert last_complete_checkpoint(run) == str(run / "checkpoint-1")
    result = train(make_config(run, max_steps=3, save_steps=1, **FAST), *load(tiny_model_dir), resume=True)
    assert f"{run}: resuming from checkpoint-1\n" in capsys.readouterr().out
    assert result.metrics["global_step"] == 3 and not list(run.glob(".tmp-*"))
    assert all(checkpoint_problem(run / f"checkpoint-{step}") is None for step in (1, 2, 3))


def test_resume_skips_incomplete_checkpoints_and_says_which(tmp_path, tiny_model_dir, capsys):
    """Checkpoints an older moelora left when a save was cut short: resume continues from the newest whole one."""
    run = tmp_path / "run"
    config = make_config(run, max_steps=4, save_steps=1, **FAST)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(config, *load(tiny_model_dir), callbacks=[FailAt(step=4)])
    weights = run / "checkpoint-3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (run / "checkpoint-4").mkdir()  # killed before its trainer state was written
    for name, content in files_of(run / "checkpoint-2").items():
        if name != "trainer_state.json":
            (run / "checkpoint-4" / name).write_bytes(content)
    capsys.readouterr()
    result = train(config, *load(tiny_model_dir), resume=True)
    assert (
        f"{run}: resuming from checkpoint-2; skipped incomplete checkpoint-4 (trainer_state.json missing), "
        "checkpoint-3 (adapter_model.safetensors cut short)\n"
    ) in capsys.readouterr().out
    assert result.metrics["global_step"] == 4 and logged_steps(run) == [1, 2, 3, 4]
    assert all(checkpoint_problem(run / f"checkpoint-{step}") is None for step in (2, 3, 4))  # save_total_limit=3


def test_metrics_and_logs_cover_the_whole_run_across_a_resume(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole = train(make_config(tmp_path / "whole", max_steps=4, **FAST), *load(tiny_model_dir)).metrics
    run = tmp_path / "run"
    config = make_config(run, max_steps=4, **FAST)
    with pytest.raises(RuntimeError, match="injected crash"):  # after step 3 was logged, past checkpoint-2
        train(config, *load(tiny_model_dir), callbacks=[FailAt(step=4)])
    started = time.time()
    train(config, *load(tiny_model_dir), resume=True)
    resumed_for = time.time() - started
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["tokens_seen"] == whole["tokens_seen"]
    assert metrics["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    at_checkpoint = json.loads((run / "checkpoint-2" / PROGRESS_NAME).read_text())  # the first segment's part
    assert at_checkpoint["train_runtime"] < metrics["train_runtime"] <= at_checkpoint["train_runtime"] + resumed_for
    assert metrics["train_tokens_per_second"] == pytest.approx(metrics["tokens_seen"] / metrics["train_runtime"])
    assert metrics["train_steps_per_second"] == pytest.approx(4 / metrics["train_runtime"], rel=1e-2)
    assert logged_steps(run) == [1, 2, 3, 4]  # step 3 of the crashed segment is not there twice
    folders = list((run / "runs").iterdir())
    assert len(folders) == 1, "a resumed run continues its own TensorBoard folder"
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_run_stopped_after_its_last_checkpoint_resumes_without_another_step(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    config = make_config(run, max_steps=2, save_steps=1, **FAST)
    first = train(config, *load(tiny_model_dir)).metrics
    (run / "train_metrics.json").unlink()  # as if stopped between the last checkpoint and the end
    metrics = train(config, *load(tiny_model_dir), resume=True).metrics
    assert metrics["global_step"] == 2 and not (run / "checkpoint-3").exists()
    assert metrics["tokens_seen"] == first["tokens_seen"]
    assert metrics["train_loss"] == pytest.approx(first["train_loss"])
    assert logged_steps(run) == [1, 2]


def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, tiny_model_dir, capsys):
    from moelora.cli import main

    run = tmp_path / "run"
    config = make_config(run, max_steps=2, **FAST)
    config.model = str(tiny_model_dir)
    train(config, *load(tiny_model_dir))
    before = {path.name: path.stat().st_mtime_ns for path in run.iterdir()}
    with pytest.raises(TrainingFinished, match=r"training finished already \(2 steps\); nothing to resume"):
        train(config, *load(tiny_model_dir), resume=True)
    config.save(tmp_path / "run.yaml")
    capsys.readouterr()
    assert main(["train", str(tmp_path / "run.yaml"), "--resume"]) == 0
    assert capsys.readouterr().out == (
        f"{run}: training finished already (2 steps); nothing to resume (--overwrite trains it again)\n"
    )
    assert {path.name: path.stat().st_mtime_ns for path in run.iterdir()} == before

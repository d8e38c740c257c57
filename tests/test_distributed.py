"""DDP with 2 CPU processes (gloo) through torchrun: both ranks must end with identical adapter weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from moelora.data import bundled_train_sources


def test_torchrun_two_cpu_processes_end_identical(tmp_path, tiny_model_dir):
    config = {
        "method": "d2mora",
        "adapter": {"r": 4, "lora_alpha": 8, "num_down_experts": 2, "num_up_experts": 3},
        "data": {
            "train_files": [f"{t}={p}" for t, p in bundled_train_sources(include_approx=False).items()],
            "max_records_per_task": 8,
            "val_size": 0,
            "cutoff_len": 96,
        },
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 3,
            "warmup_steps": 1,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "save_steps": 100,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "report_to": [],
        },
    }
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    driver = Path(__file__).with_name("ddp_driver.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               str(driver), str(tiny_model_dir), str(config_path), str(tmp_path)]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    for rank in (0, 1):
        with safe_open(tmp_path / f"rank{rank}.safetensors", "pt") as handle:
            assert handle.metadata()["world_size"] == "2"
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(k.endswith("d2mora_B.default") and rank0[k].abs().sum() > 0 for k in rank0), "training must move B"
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert len(saved) == len(rank0)
    # the ranks split the data: without a process group each would train alone and still end identical
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed_type"] == "MULTI_CPU"


def test_the_train_command_runs_under_torchrun_and_evaluates_once(tmp_path, tiny_model_dir):
    train_files = [f"{t}={p}" for t, p in bundled_train_sources(include_approx=False).items()]
    config = {
        "model": str(tiny_model_dir),
        "method": "d2mora",
        "adapter": {"r": 4, "lora_alpha": 8, "num_down_experts": 2, "num_up_experts": 3},
        "data": {"train_files": train_files, "max_records_per_task": 4, "val_size": 0, "cutoff_len": 64},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "warmup_steps": 0, "global_batch_size": 4,
                     "micro_batch_size": 1, "save_steps": 100, "report_to": []},
        "evaluation": {"test_files": "bundled", "protocols": ["likelihood"], "max_items": 2},
    }  # fmt: skip
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
               "-m", "moelora.cli", "train", str(config_path)]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.count("| d2mora | likelihood |") == 1
    assert (tmp_path / "run" / "eval_d2mora" / "results_likelihood.json").is_file()


def _launch_with_accelerate(accelerate_config: str, tmp_path, tiny_model_dir) -> subprocess.CompletedProcess:
    """`accelerate launch` with a shipped config, overridden to 2 processes and no mixed precision (CPU)."""
    train_files = [f"{t}={p}" for t, p in bundled_train_sources(include_approx=False).items()]
    config = {
        "model": str(tiny_model_dir),
        "method": "molora",
        "adapter": {"r": 4, "lora_alpha": 8, "num_experts": 3, "top_k": 1},
        "data": {"train_files": train_files, "max_records_per_task": 4, "val_size": 0, "cutoff_len": 64},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "warmup_steps": 0, "global_batch_size": 4,
                     "micro_batch_size": 1, "save_steps": 100, "report_to": []},
    }  # fmt: skip
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "configs" / "accelerate" / accelerate_config), "--num_processes", "2", "--main_process_port",
               "29535", "--mixed_precision", "no", "-m", "moelora.cli", "train", str(config_path)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_accelerate_launch_with_the_shipped_ddp_config_trains_on_two_processes(tmp_path, tiny_model_dir):
    completed = _launch_with_accelerate("ddp.yaml", tmp_path, tiny_model_dir)
    assert completed.returncode == 0, completed.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    assert load_file(tmp_path / "run" / "adapter_model.safetensors")


def test_fsdp_config_without_gpus_is_refused_instead_of_running_unsharded(tmp_path, tiny_model_dir):
    completed = _launch_with_accelerate("fsdp.yaml", tmp_path, tiny_model_dir)
    assert completed.returncode != 0
    assert "asks for FSDP, but accelerate set up MULTI_CPU" in completed.stderr

"""The device lease's scripts (scripts/device/), run here end to end with tiny settings: what a lease would do,
minus the GPU. prepare.sh splits the real GGUF file and packs the real data; call1.sh stores the first half;
call2.sh joins and checks the halves and runs the real experiment file (configs/experiments/commonsense-gpu.yaml)
with overrides that shrink it to seconds, then packs the results as they come back from the device."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from moelora.models import default_model_path, smollm2_gguf_path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "commonsense").is_dir(), reason="needs ../shared/data beside the checkout"),
]
TINY = [
    "data.max_records_per_task=4", "training.max_steps=1", "training.warmup_steps=0", "training.global_batch_size=4",
    "training.micro_batch_size=4", "evaluation.max_items=2", "evaluation.generate_max_items=1",
    "evaluation.max_new_tokens=3", "evaluation.batch_size=4",
]  # fmt: skip


def run(script: str, environment: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", f"scripts/device/{script}", *args], cwd=ROOT, env=environment, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def lease(tmp_path_factory, tiny_model_dir):
    """prepare.sh and call1.sh once; the environment the calls see (python3 is this interpreter)."""
    folder = tmp_path_factory.mktemp("lease")
    cache = folder / "cache" / "models"
    cache.mkdir(parents=True)
    (cache / "smollm2-135m").symlink_to(default_model_path())  # converted already: the call skips converting
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "MOELORA_DEVICE_PAYLOAD": str(folder / "payload"),
        "MOELORA_DEVICE_STORE": str(folder / "store"),
        "MOELORA_CACHE": str(folder / "cache"),
        "OUT": str(folder / "out1"),
    }
    prepared = run("prepare.sh", environment, "--no-wheels")
    assert prepared.returncode == 0, prepared.stderr
    stored = run("call1.sh", environment)
    assert stored.returncode == 0, stored.stderr
    return folder, environment, prepared.stdout


def test_prepare_splits_the_model_and_packs_the_data_within_the_transfer_limit(lease):
    folder, _, printed = lease
    payload = folder / "payload"
    (first,) = (payload / "part1").glob("*.part1")
    (second,) = (payload / "part2").glob("*.part2")
    gguf = smollm2_gguf_path()
    assert first.read_bytes() + second.read_bytes() == gguf.read_bytes()
    assert (payload / "part2" / "gguf.sha256").read_text().strip() == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert "call 1 carries" in printed and "call 2 carries" in printed
    with tarfile.open(payload / "part1" / "commonsense.tar.xz") as archive:
        packed = {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}
    originals = {str(path.relative_to(SHARED)): path for path in (SHARED / "commonsense").rglob("*") if path.is_file()}
    assert packed.keys() == originals.keys()
    assert all(packed[name] == path.read_bytes() for name, path in originals.items())


def test_call1_stores_the_first_half_and_reports_the_environment(lease):
    folder, _, _ = lease
    assert len(list((folder / "store").glob("*.part1"))) == 1
    env = (folder / "out1" / "env.txt").read_text()
    assert "transformers " in env and "datasets: ok" in env and "mps: " in env


def test_call2_runs_the_experiment_file_and_packs_its_results(lease, tiny_model_dir):
    folder, environment, _ = lease
    out = folder / "out2"
    out.mkdir()
    experiment = folder / "experiment"
    only = ["--only", "label/peft_lora/seed42", "--only", "text/d2mora/seed42"]
    called = run(
        "call2.sh", {**environment, "OUT": str(out)}, f"model={tiny_model_dir}", *TINY, "--output-dir",
        str(experiment), *only,
    )  # fmt: skip
    assert called.returncode == 0, called.stdout[-3000:] + called.stderr[-3000:]
    assert "experiment exit status 0" in called.stdout
    assert (experiment / "experiment.md").is_file()
    with tarfile.open(out / "results.tar.xz") as archive:
        names = set(archive.getnames())
        prefix = f"{experiment.name}/label/peft_lora/seed42"
        for name in ("train_metrics.json", "train_log.json", "moelora_run.yaml", "eval_base/results_likelihood.json",
                     "eval_peft_lora/results_cloze_norm.json", "eval_peft_lora/results_generate.json"):  # fmt: skip
            assert f"{prefix}/{name}" in names
        assert f"{experiment.name}/text/d2mora/seed42/eval_d2mora/results_cloze.json" in names
        assert not any("checkpoint-" in name or name.endswith("adapter_model.safetensors") for name in names)
        rows = archive.extractfile(f"{prefix}/eval_peft_lora/predictions_likelihood_piqa.jsonl").read().splitlines()
        assert len(rows) == 2 and all("instruction" not in json.loads(row) for row in rows)
    assert (out / "adapter_text_d2mora_seed42.safetensors").is_file()
    assert not list(out.glob("adapter_label_peft_lora*")), "only D2MoRA adapters travel back"
    assert "written to" in (out / "experiment.log").read_text()


def test_call2_refuses_a_corrupt_half_before_running_anything(lease, tmp_path):
    folder, environment, _ = lease
    payload = tmp_path / "payload"
    (payload / "part2").mkdir(parents=True)
    for source in (folder / "payload" / "part2").iterdir():
        (payload / "part2" / source.name).symlink_to(source)
    (second,) = (payload / "part2").glob("*.part2")
    second.unlink()
    corrupt = bytearray((folder / "payload" / "part2" / second.name).read_bytes())
    corrupt[1000] ^= 1
    second.write_bytes(bytes(corrupt))
    out = tmp_path / "out"
    out.mkdir()
    called = run("call2.sh", {**environment, "OUT": str(out), "MOELORA_DEVICE_PAYLOAD": str(payload)}, "--only", "x")
    assert called.returncode != 0 and "FAILED" in called.stdout + called.stderr
    assert not (out / "experiment.log").exists()


def test_gpu_checks_runs_every_step_under_its_limit_and_summarises(lease, tmp_path):
    """gpu_checks.sh (issue 17's call) as a CPU dry run: the tests, both benchmarks and the scale checks all run
    and report; on a CPU the QLoRA and FSDP checks are refused with moelora's own messages, as they must be."""
    _, environment, _ = lease
    out = tmp_path / "out"
    done = run("gpu_checks.sh", {**environment, "OUT": str(out), "MOELORA_CHECKS_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for step in ("tests", "train_step", "modules", "scale_checks"):
        assert f"{step}: exit 0 after" in summary, summary
    assert " passed" in summary and (out / "env.txt").is_file()
    assert (out / "bench" / "train_step.md").is_file() and (out / "bench" / "modules.md").is_file()
    checks = json.loads((out / "scale_checks.json").read_text())
    qlora, fsdp = checks["qlora"], checks["fsdp"]
    assert qlora["exit"] not in (0, "timeout") and "needs a CUDA GPU" in qlora["stderr_tail"] + qlora["stdout_tail"]
    assert fsdp["exit"] not in (0, "timeout") and "asks for FSDP, but accelerate set up" in fsdp["stderr_tail"]
    assert not (out / "scale_checks").exists()  # the random model and the runs stay on the device

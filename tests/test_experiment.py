"""`moelora experiment`: a file of runs trained side by side, resumed where it stopped, compared per group."""

from __future__ import annotations

import json

import pytest
import yaml

from moelora.cli import main
from moelora.config import BUNDLED, resolve_test_files
from moelora.data import bundled_train_sources
from moelora.experiment import load_experiment, merge, run_state


def experiment_spec(model_dir, output_dir) -> dict:
    train_files = [f"{task}={file}" for task, file in bundled_train_sources(include_approx=False).items()]
    tests = resolve_test_files(BUNDLED)
    return {
        "output_dir": str(output_dir),
        "jobs": 2,
        "base": {
            "model": str(model_dir),
            "adapter": {"lora_dropout": 0.0},
            "data": {"train_files": train_files, "max_records_per_task": 3, "val_size": 0, "cutoff_len": 96},
            "training": {
                "max_steps": 2,
                "warmup_steps": 0,
                "global_batch_size": 4,
                "micro_batch_size": 4,
                "save_steps": 1,
                "learning_rate": 1e-3,
                "report_to": [],
            },  # fmt: skip
            "evaluation": {
                "test_files": {t: tests[t] for t in ("boolq", "piqa")},
                "protocols": ["likelihood"],
                "max_items": 4,
                "subset_seed": 0,
            },  # fmt: skip
        },
        "groups": {
            "mix": {
                "runs": {
                    "lora": {"method": "lora", "adapter": {"r": 4, "lora_alpha": 8}, "seeds": [1, 2]},
                    "d2mora": {"method": "d2mora", "adapter": {"r": 2, "num_down_experts": 2, "num_up_experts": 3}},
                }
            },
            "piqa-only": {
                "settings": {"evaluation": {"test_files": {"piqa": tests["piqa"]}}},
                "runs": {"lora": {"method": "lora", "adapter": {"r": 4}}},
            },
        },
        "reports": [["mix/d2mora/seed42"]],
    }


def write(path, spec) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def test_merge_keeps_nested_keys_and_replaces_lists():
    merged = merge({"adapter": {"r": 8, "target_modules": ["q"]}, "x": [1]}, {"adapter": {"r": 4}, "x": [2]})
    assert merged == {"adapter": {"r": 4, "target_modules": ["q"]}, "x": [2]}
    tests = {"evaluation": {"test_files": {"boolq": "a", "piqa": "b"}, "max_items": 3}}
    merged = merge(tests, {"evaluation": {"test_files": {"piqa": "c"}}})
    assert merged == {"evaluation": {"test_files": {"piqa": "c"}, "max_items": 3}}  # test files: replaced whole


def test_experiment_runs_compares_skips_and_evaluates_only_what_is_missing(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "exp"
    path = write(tmp_path / "exp.yaml", experiment_spec(tiny_model_dir, out))
    assert main(["experiment", path]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 4 to do, 2 at a time with" in printed

    mix = (out / "mix" / "comparison.md").read_text()
    assert "| lora | likelihood | " in mix and "| 1, 2 |" in mix  # two seeds, one row
    assert "| base | likelihood | 0 |" in mix and "| d2mora | likelihood |" in mix
    assert "Items per task: BoolQ 4, PIQA 4." in mix
    single = (out / "piqa-only" / "comparison.md").read_text()
    assert "Items per task: PIQA 4." in single and "| base |" in single
    summary = (out / "experiment.md").read_text()
    assert "## mix" in summary and "## piqa-only" in summary and "| lora | 2 | lora |" in summary
    assert (out / "reports" / "mix.d2mora.seed42" / "report.md").is_file()
    # the base model is evaluated once per group, with the group's first run
    assert (out / "mix" / "lora" / "seed1" / "eval_base").is_dir()
    assert not (out / "mix" / "lora" / "seed2" / "eval_base").exists()
    # the random draw is the same for every run, and recorded
    draws = [
        [json.loads(line)["index"] for line in (run / "eval_lora" / "predictions_likelihood_piqa.jsonl").open()]
        for run in (out / "mix" / "lora" / "seed1", out / "piqa-only" / "lora" / "seed42")
    ]
    assert draws[0] == draws[1] != [0, 1, 2, 3]

    # a second call finds everything done
    assert main(["experiment", path]) == 0
    assert "4 runs, 0 to do" in capsys.readouterr().out

    # a trained run whose results are gone is only evaluated, not retrained
    run = out / "mix" / "d2mora" / "seed42"
    adapter_written = (run / "adapter_model.safetensors").stat().st_mtime_ns
    (run / "eval_d2mora" / "results_likelihood.json").unlink()
    experiment = load_experiment(path)
    assert [run_state(r) for r in experiment.runs] == ["done", "done", "evaluate", "done"]
    assert main(["experiment", path, "--only", "mix/d2mora*"]) == 0
    assert "1 to do" in capsys.readouterr().out
    assert (run / "eval_d2mora" / "results_likelihood.json").is_file()
    assert (run / "adapter_model.safetensors").stat().st_mtime_ns == adapter_written

    # a run folder trained with other settings than the file now gives is refused, not reused
    spec = experiment_spec(tiny_model_dir, out)
    spec["groups"]["mix"]["runs"]["lora"]["adapter"]["r"] = 8
    assert main(["experiment", write(tmp_path / "changed.yaml", spec)]) == 1
    assert "mix/lora/seed1" in capsys.readouterr().err


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "exp"
    spec = experiment_spec(tiny_model_dir, out)
    spec["groups"] = {"g": {"runs": {"lora": {"method": "lora", "adapter": {"r": 4}}}}}
    spec["reports"] = []
    path = write(tmp_path / "exp.yaml", spec)
    assert main(["experiment", path]) == 0
    run = load_experiment(path).runs[0]
    (run.folder / "train_metrics.json").unlink()  # as if stopped after its last checkpoint
    assert run_state(run) == "resume"
    capsys.readouterr()
    assert main(["experiment", path]) == 0
    assert "start g/lora/seed42 (resume)" in capsys.readouterr().out
    assert run_state(run) == "done"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(extra=1), "unknown key(s) ['extra']"),
        (lambda s: s.pop("output_dir"), "output_dir is required"),
        (
            lambda s: s["groups"]["mix"]["runs"]["lora"]["adapter"].update(bogus=1),
            "bogus' (method 'lora', config LoraConfig) (mix/lora/seed1, mix/lora/seed2)",
        ),
        (lambda s: s["groups"]["mix"]["runs"]["lora"].update(seeds=[1, 1]), "repeats a seed"),
        (lambda s: s["groups"]["mix"]["runs"]["lora"].update(seeds="1"), "seeds must be a non-empty list"),
        (lambda s: s.update(reports=[["mix/nope/seed1"]]), "reports[0]"),
        (lambda s: s.update(jobs=0), "jobs must be a positive integer"),
        (lambda s: s["groups"]["mix"].update(run={}), "groups.mix: unknown key(s) ['run']"),
        (lambda s: s["groups"]["mix"]["runs"]["lora"].update(training={"bogus": 1}), "unknown key(s) ['bogus']"),
    ],
)
def test_experiment_file_errors_name_the_field(tmp_path, change, message):
    spec = experiment_spec("unused-model", tmp_path / "exp")
    change(spec)
    with pytest.raises(ValueError) as error:
        load_experiment(write(tmp_path / "exp.yaml", spec))
    assert message in str(error.value)
    assert not (tmp_path / "exp").exists()  # nothing written before the file is valid


def test_missing_input_files_of_every_run_are_listed_before_anything_starts(tmp_path, capsys):
    """A clone without ../shared: every run's missing training and test files are named in one error, before any
    run starts (nothing is written)."""
    from moelora.cli import main

    spec = experiment_spec("unused-model", tmp_path / "exp")
    spec["base"]["data"]["train_files"] = ["piqa=/nowhere/piqa/train.json"]
    spec["base"]["evaluation"]["test_files"] = {"piqa": "/nowhere/piqa/test.json"}
    spec["groups"]["mix"]["runs"]["lora"]["training"] = {"global_batch_size": 0}
    path = write(tmp_path / "exp.yaml", spec)
    assert main(["experiment", str(path)]) == 1
    error = capsys.readouterr().err
    assert "nothing was started" in error and "/nowhere/piqa/train.json: file not found" in error
    assert "evaluation.test_files.piqa: /nowhere/piqa/test.json: file not found" in error
    assert "training.global_batch_size: must be at least 1, got 0 (mix/lora/seed1, mix/lora/seed2)" in error
    assert "/nowhere/piqa/train.json: file not found (every run)" in error  # one line per problem, not per run
    assert not (tmp_path / "exp").exists()

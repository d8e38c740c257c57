"""Bad inputs a user can give, through `moelora.cli.main`: each is refused with exit status 1 and one
`moelora: error:` line (a list of problems continues on indented lines) naming the file, record or field to fix,
never a traceback; and wherever the problem can be found before the model loads, it is.

The model loader is replaced by one that raises `ModelLoaded`, so a case that reaches it fails loudly, and a valid
input shows that it passed every check by reaching it. Ends with a seeded fuzz test over mutated data files and
configs. Nothing here trains; only the full-disk case loads a (tiny) model.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_llama
from peft import get_peft_model

import moelora.evaluation
import moelora.models
from moelora.cli import main
from moelora.config import load_config, resolve_test_files, resolve_train_files
from moelora.data import bundled_test_files, bundled_train_sources, format_prompt, load_mixture, parse_sources
from moelora.evaluation import cloze_prompt_and_options, load_test_items
from moelora.tasks import TASKS
from moelora.training import build_adapter_config

REAL_MODEL_LOADER = moelora.models.load_model_and_tokenizer


class ModelLoaded(Exception):
    """Raised by the stand-in model loader: every check passed and the command went on to load the model."""


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: Any, *args: Any, **kwargs: Any) -> None:
        raise ModelLoaded(str(name))

    monkeypatch.setattr(moelora.models, "load_model_and_tokenizer", refuse)


def cli_error(capsys: pytest.CaptureFixture[str], *argv: Any) -> str:
    """Run the command; it must exit 1 with one `moelora: error:` line (problems of a list indented under it) last
    on stderr (progress bars may come before it) and no traceback. Returns the error from that line on."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    heads = [number for number, line in enumerate(lines) if line.startswith("moelora: error:")]
    assert len(heads) == 1, err
    error = lines[heads[0] :]
    assert all(line.startswith("  ") for line in error[1:]), err
    return "\n".join(error)


def assert_names(error: str, *parts: Any) -> None:
    for part in parts:
        assert str(part) in error, f"{part!r} not in {error!r}"


# ------------------------------------------------------------------------------------------- a valid run


def piqa_records(split: str, count: int) -> list[dict[str, Any]]:
    source = bundled_train_sources() if split == "train" else bundled_test_files()
    return json.loads(source["piqa"].read_text())[:count]


class Inputs:
    """A valid run: a 6-record PIQA training file, a 3-record test file and a config naming them, in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.train = folder / "piqa" / "train.json"
        self.test = folder / "piqa_test.json"
        self.config = folder / "run.yaml"
        self.output_dir = folder / "run"
        self.train.parent.mkdir(parents=True, exist_ok=True)
        self.write_train(piqa_records("train", 6))
        self.write_test(piqa_records("test", 3))
        self.values: dict[str, Any] = {
            "model": str(folder / "model-never-loaded"),
            "method": "d2mora",
            "adapter": {"r": 4, "lora_alpha": 8, "num_down_experts": 2, "num_up_experts": 3},
            "data": {"train_files": [f"piqa={self.train}"], "val_size": 1, "cutoff_len": 96},
            "training": {
                "output_dir": str(self.output_dir),
                "max_steps": 2,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "report_to": [],
            },
            "evaluation": {
                "test_files": {"piqa": str(self.test)},
                "protocols": ["likelihood", "cloze"],
                "max_items": 2,
            },
        }
        self.write_config(self.values)

    def write_train(self, content: Any) -> None:
        write(self.train, content)

    def write_test(self, content: Any) -> None:
        write(self.test, content)

    def write_config(self, values: Any) -> None:
        self.config.write_text(yaml.safe_dump(values, sort_keys=False))


def write(path: Path, content: Any) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content, indent=1))


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    return Inputs(tmp_path)


def test_the_valid_run_passes_every_check(inputs: Inputs) -> None:
    """The cases below change one thing of this run: it must itself get as far as loading the model."""
    with pytest.raises(ModelLoaded):
        main(["train", str(inputs.config)])


# ------------------------------------------------------------------------------- training and test files

GOOD = piqa_records("train", 6)
NO_OPTIONS = "Please choose the correct solution to the question: how do I boil water?"


def with_record(index: int, **changes: Any) -> list[dict[str, Any]]:
    """The good records with record `index` changed; a value of ... deletes the field."""
    records = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is ...:
            del records[index][key]
        else:
            records[index][key] = value
    return records


DATA_CASES = {
    "malformed JSON": ('[{"instruction": "a",\n "output": }]', ["invalid JSON at line 2"]),
    "JSON that is not a list": ('{"question": "a"}', ["record 0", "missing field 'instruction'"]),
    "JSON that is a string": ('"just text"', ["record 0", "expected a JSON object, got str"]),
    "empty list": ("[]", ["no records"]),
    "empty file": ("", ["no records"]),
    "record not an object": ([GOOD[0], ["a", "b"]], ["record 1", "expected a JSON object, got list"]),
    "missing instruction": (with_record(3, instruction=...), ["record 3", "missing field 'instruction'"]),
    "missing output": (with_record(2, output=...), ["record 2", "missing field 'output'"]),
    "non-string output": (with_record(1, output=7), ["record 1", "field 'output' must be a string, got int"]),
    "null instruction": (with_record(0, instruction=None), ["record 0", "'instruction' must be a string"]),
    "blank instruction": (with_record(4, instruction="   "), ["record 4", "field 'instruction' is empty"]),
    "answer not a label": (with_record(5, answer="solution3"), ["record 5", "'answer'", "'solution3'", "solution1"]),
    "non-empty input": (with_record(2, input="context"), ["record 2", "field 'input' is non-empty"]),
    "JSON Lines with a bad line": (
        "\n".join(json.dumps(r) for r in GOOD[:2]) + '\n{"instruction": oops}\n',
        ["invalid JSON at line 3"],
    ),
    "binary garbage": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00", ["not UTF-8 text"]),
    "nested too deeply": ("[" * 50_000, ["nested too deeply"]),
}


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_a_bad_training_file_is_named_before_the_model_loads(inputs: Inputs, capsys, case: str) -> None:
    content, parts = DATA_CASES[case]
    inputs.write_train(content)
    error = cli_error(capsys, "train", inputs.config)
    assert_names(error, "data.train_files", inputs.train, *parts)
    assert not inputs.output_dir.exists()


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        ("[1, 2", ["invalid JSON"]),
        (piqa_records("test", 3)[:1] + [{**piqa_records("test", 3)[1], "answer": ""}], ["record 1", "'answer'"]),
        (
            [{k: v for k, v in piqa_records("test", 1)[0].items() if k != "answer"}],
            ["record 0", "missing field 'answer'"],
        ),
        ([{**piqa_records("test", 1)[0], "instruction": NO_OPTIONS}], ["record 0", "cloze", "Solution1"]),
        ("[]", ["no records"]),
    ],
    ids=["malformed JSON", "empty answer", "missing answer", "cloze without options", "empty list"],
)
def test_a_bad_test_file_is_named_before_the_model_loads(inputs: Inputs, capsys, content: Any, parts: list) -> None:
    inputs.write_test(content)
    error = cli_error(capsys, "train", inputs.config)
    assert_names(error, "evaluation.test_files.piqa", inputs.test, *parts)


def test_text_targets_and_the_shuffled_control_check_their_records_before_the_model_loads(inputs: Inputs, capsys):
    inputs.write_train(with_record(2, instruction=NO_OPTIONS))
    error = cli_error(capsys, "train", inputs.config, "data.target=text")
    assert_names(error, inputs.train, "record 2", "field 'instruction'", "Solution1")
    inputs.write_train(with_record(4, output="I cannot tell"))
    error = cli_error(capsys, "train", inputs.config, "data.shuffled_label_control=true")
    assert_names(error, inputs.train, "record 4", "does not name its answer")


def test_every_bad_file_is_listed_in_one_pass(inputs: Inputs, capsys) -> None:
    second = inputs.folder / "boolq" / "train.json"
    second.parent.mkdir()
    second.write_text("[{]")
    inputs.write_train(with_record(1, output=...))
    inputs.write_test("[]")
    error = cli_error(
        capsys, "train", inputs.config, f"data.train_files=[piqa={inputs.train}, boolq={second}]",
        "training.micro_batch_size=3",
    )  # fmt: skip
    lines = error.splitlines()[1:]
    assert len(lines) == 4, error
    assert_names(error, f"{inputs.train}: record 1", f"{second}: invalid JSON", f"{inputs.test}: no records")
    assert_names(error, "global_batch_size=4 is not divisible by micro_batch_size=3")


def test_a_failed_run_reruns_with_the_same_command_once_the_file_is_fixed(inputs: Inputs, capsys) -> None:
    inputs.write_train(with_record(3, answer="solution9"))
    cli_error(capsys, "train", inputs.config)
    assert not inputs.output_dir.exists()  # nothing left behind that the next run would have to be told about
    inputs.write_train(GOOD)
    with pytest.raises(ModelLoaded):
        main(["train", str(inputs.config)])


# ------------------------------------------------------------------------------------------ run settings


SETTING_CASES = [
    (["data.train_files=[nosuchtask={train}]"], ["unknown task 'nosuchtask'"]),
    (["data.train_files=[piqa={folder}/missing.json]"], ["data.train_files", "missing.json: file not found"]),
    (["data.train_files=[]"], ["data.train_files: no training files given"]),
    (["evaluation.test_files={{piqa: {folder}/missing.json}}"], ["evaluation.test_files.piqa", "missing.json"]),
    (["evaluation.test_files={{nosuchtask: {test}}}"], ["evaluation.test_files", "unknown task 'nosuchtask'"]),
    (["evaluation.test_files=somewhere"], ["evaluation.test_files", "'bundled'"]),
    (["training.learning_rat=1e-3"], ["unknown key(s) ['learning_rat']"]),
    (["training.learning_rate=fast"], ["training.learning_rate: expected float, got 'fast'"]),
    (["training.max_steps=[2]"], ["training.max_steps: expected int"]),
    (["training=5"], ["'training' must be a mapping"]),
    (["method=no_such_method"], ["unknown method 'no_such_method'"]),
    (["adapter.num_experts=4"], ["adapter", "num_experts"]),
    (["adapter.r=0"], ["r must be an integer >= 1, got 0"]),
    (["method=molora", "adapter={{num_experts: 2, top_k: 3}}"], ["top_k must be <= num_experts=2"]),
    (["adapter.target_modules=5"], ["adapter.target_modules: expected"]),
    (["method=peft_lora", "adapter={{r: eight}}"], ["adapter.r: expected int, got 'eight'"]),
    (["training.global_batch_size=0"], ["training.global_batch_size: must be at least 1, got 0"]),
    (["data.cutoff_len=0"], ["data.cutoff_len: must be at least 1, got 0"]),
    (["training.global_batch_size=5"], ["global_batch_size=5 is not divisible by micro_batch_size=2"]),
    (["training.max_steps=0"], ["nothing to train"]),
    (["evaluation.protocols=[likelihood, vibes]"], ["evaluation.protocols: unknown ['vibes']"]),
    (["evaluation.max_items=0"], ["evaluation.max_items: must be at least 1, got 0"]),
    (["model_dtype=fp8"], ["model_dtype: expected one of fp32, bf16, fp16, got 'fp8'"]),
    (["model_quantization=3bit"], ["model_quantization", "'3bit'"]),
    (["training.precision=fp64"], ["training.precision: expected one of fp32, bf16, fp16, got 'fp64'"]),
    (["training.train_sampling=sorted"], ["training.train_sampling", "'sorted'"]),
    (["data.template=alpaca"], ["data.template: expected one of d2mora, llm_adapters, got 'alpaca'"]),
    (["data.val_size=6"], ["data.val_size: 6 must be >= 0 and smaller than the number of training records (6"]),
    (["data.max_records_per_task=2", "data.val_size=2"], ["data.val_size: 2", "records (2"]),
    (["data.val_size=-1"], ["data.val_size: -1"]),
    (["training.seed"], ["override 'training.seed' is not of the form key=value"]),
]


@pytest.mark.parametrize(("overrides", "parts"), SETTING_CASES, ids=[" ".join(o) for o, _ in SETTING_CASES])
def test_a_bad_setting_is_named_before_the_model_loads(inputs: Inputs, capsys, overrides: list, parts: list):
    names = {"folder": inputs.folder, "train": inputs.train, "test": inputs.test}
    error = cli_error(capsys, "train", inputs.config, *(o.format(**names) for o in overrides))
    assert_names(error, *parts)
    assert not inputs.output_dir.exists()


def test_every_bad_setting_of_every_section_is_listed_at_once(inputs: Inputs, capsys) -> None:
    overrides = ["data.cutoff_len=long", "training.seeed=1", "training.warmup_steps=[1]", "evaluation.batch_size=x"]
    error = cli_error(capsys, "train", inputs.config, *overrides)
    assert_names(error, "data.cutoff_len: expected int", "unknown key(s) ['seeed']", "training.warmup_steps: ")
    assert_names(error, "evaluation.batch_size: expected int")
    assert len(error.splitlines()) == 5, error


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("model: [unclosed\nmethod: d2mora\n", ["invalid YAML at line", "run.yaml"]),
        ("data:\n  train_files: [a]\n bad_indent: 1\n", ["invalid YAML at line 3", "run.yaml"]),
        ("- a list\n- not a mapping\n", ["run.yaml: top level must be a mapping"]),
        (b"\xff\xfe\x00binary", ["run.yaml: not UTF-8 text"]),
        ("1: one\nmodel: x\n", ["unknown key(s) [1"]),
    ],
    ids=["YAML syntax error", "YAML bad indent", "YAML list", "binary config", "number as key"],
)
def test_a_bad_config_file_is_named(inputs: Inputs, capsys, text: Any, parts: list) -> None:
    write(inputs.config, text)
    assert_names(cli_error(capsys, "train", inputs.config), *parts)


def test_a_missing_config_file_or_a_folder_in_its_place_is_named(inputs: Inputs, capsys) -> None:
    assert_names(cli_error(capsys, "train", inputs.folder / "nope.yaml"), "nope.yaml does not exist")
    assert_names(cli_error(capsys, "train", inputs.folder), f"config file {inputs.folder} is a folder")


# ------------------------------------------------------------------------------------------- output folders


def test_an_output_folder_under_a_file_is_named_before_the_model_loads(inputs: Inputs, capsys) -> None:
    blocker = inputs.folder / "a-file"
    blocker.write_text("not a folder")
    error = cli_error(capsys, "train", inputs.config, f"training.output_dir={blocker}/runs/x")
    assert_names(error, "training.output_dir", f"{blocker}/runs/x cannot be created", f"{blocker} is a file")
    error = cli_error(capsys, "train", inputs.config, f"training.output_dir={blocker}")
    assert_names(error, f"training.output_dir: {blocker} is a file, not a folder")


def test_an_unwritable_output_folder_is_named_before_the_model_loads(inputs: Inputs, capsys, monkeypatch) -> None:
    parent = inputs.folder / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root may write anywhere: os.access then reports what a read-only mount would
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != parent and real_access(path, mode))
        error = cli_error(capsys, "train", inputs.config, f"training.output_dir={parent}/run")
        assert_names(error, f"training.output_dir: {parent}/run cannot be created: {parent} is not writable")
        error = cli_error(capsys, "train", inputs.config, f"training.output_dir={parent}")
        assert_names(error, f"training.output_dir: {parent} is not writable")
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------------------------------------- adapter folders


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A D2MoRA adapter of the tiny random Llama, saved as `moelora train` saves one."""
    folder = tmp_path_factory.mktemp("adapter")
    config = build_adapter_config("d2mora", {"r": 2, "num_down_experts": 2, "num_up_experts": 2})
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    return folder


@pytest.fixture
def adapter(saved_adapter: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(saved_adapter, folder)
    return folder


def test_a_valid_adapter_folder_passes_the_check(adapter: Path) -> None:
    with pytest.raises(ModelLoaded):
        main(["eval", "--adapter", str(adapter), "--model", "never-loaded"])


WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def pickled_only(folder: Path) -> None:
    """The weights as PEFT's pickled fallback file, adapter_model.bin, and no safetensors file."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


def truncate_weights(folder: Path) -> None:
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def write_config(folder: Path, text: str) -> None:
    (folder / CONFIG).write_text(text)


def change_config(folder: Path, **changes: Any) -> None:
    write_config(folder, json.dumps({**json.loads((folder / CONFIG).read_text()), **changes}))


#: case -> (what damages the saved adapter folder, what the error must say; {folder} is the folder)
ADAPTER_CASES = {
    "pickled weights only": (
        pickled_only,
        "{folder}/adapter_model.bin: moelora loads adapter weights from adapter_model.safetensors only",
    ),
    "truncated safetensors": (truncate_weights, "{folder}/adapter_model.safetensors: not a complete safetensors file"),
    "empty safetensors": (lambda f: (f / WEIGHTS).write_bytes(b""), "{folder}/adapter_model.safetensors: not a"),
    "no weights": (lambda f: (f / WEIGHTS).unlink(), "{folder} holds no adapter_model.safetensors"),
    "config not JSON": (lambda f: write_config(f, '{"peft_type": "D2MORA",'), "{folder}/adapter_config.json: invalid"),
    "config a list": (lambda f: write_config(f, "[1]"), "adapter_config.json: expected a JSON object, got list"),
    "unknown peft_type": (
        lambda f: change_config(f, peft_type="MAGIC"),
        "adapter_config.json: field 'peft_type' 'MAGIC'",
    ),
    "no peft_type": (lambda f: change_config(f, peft_type=None), "adapter_config.json: field 'peft_type' None"),
    "impossible field": (
        lambda f: change_config(f, r=0),
        "adapter_config.json: D2MoRAConfig.r must be an integer >= 1",
    ),
    "official checkpoint": (
        lambda f: change_config(f, peft_type="D2MoRA"),
        "{folder} is an official D2MoRA checkpoint",
    ),
    "no config": (lambda f: (f / CONFIG).unlink(), "{folder} holds no adapter_config.json"),
    "no folder": (shutil.rmtree, "adapter folder {folder} does not exist"),
}


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=list(ADAPTER_CASES))
def test_a_bad_adapter_folder_is_named_before_the_model_loads(adapter: Path, capsys, case: str) -> None:
    damage, message = ADAPTER_CASES[case]
    damage(adapter)
    error = cli_error(capsys, "eval", "--adapter", adapter, "--model", "never-loaded")
    assert_names(error, message.format(folder=adapter))


def test_report_refuses_pickled_weights_even_without_a_model(adapter: Path, capsys) -> None:
    """--no-routing loads no model, but PEFT would still have unpickled adapter_model.bin for the similarity."""
    pickled_only(adapter)
    error = cli_error(capsys, "report", adapter, "--no-routing", "--out", adapter / "report")
    assert_names(error, f"{adapter}/adapter_model.bin: moelora loads adapter weights from {WEIGHTS} only")


def test_report_names_an_unwritable_out_folder_before_the_model_loads(adapter: Path, capsys) -> None:
    blocker = adapter.parent / "a-file"
    blocker.write_text("")
    error = cli_error(capsys, "report", adapter, "--model", "never-loaded", "--out", blocker / "report")
    assert_names(error, f"--out: {blocker / 'report'} cannot be created: {blocker} is a file")


# ---------------------------------------------------------------------------------------------- full disk


class FullDisk:
    """A file whose writes fail as on a full disk: ENOSPC from write(), whose error names no file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_results_names_the_file(tiny_model_dir, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(moelora.models, "load_model_and_tokenizer", REAL_MODEL_LOADER)
    monkeypatch.setattr(moelora.evaluation, "open", FullDisk, raising=False)
    test_file = bundled_test_files()["piqa"]
    error = cli_error(capsys, "eval", "--model", tiny_model_dir, "--test", f"piqa={test_file}", "--max-items", "1",
                      "--output-dir", tmp_path / "eval")  # fmt: skip
    assert_names(error, "No space left on device", tmp_path / "eval" / "predictions_likelihood_piqa.jsonl")


# ------------------------------------------------------------------------------------------------- fuzzing

DATA_MUTATIONS = ("drop key", "retype", "truncate", "duplicate", "garble", "replace")
ODD_VALUES: tuple[Any, ...] = (None, 0, -1, 2.5, True, "", "x", [], ["x"], {}, {"k": 1})


def mutate_data(text: str, rng: random.Random) -> tuple[str, bytes]:
    """One random damage to a JSON data file: what it is, and the damaged bytes."""
    kind = rng.choice(DATA_MUTATIONS)
    data = text.encode()
    if kind in ("drop key", "retype"):
        records = json.loads(text)
        index = rng.randrange(len(records))
        key = rng.choice(sorted(records[index]))
        if kind == "drop key":
            del records[index][key]
            return f"drop {key!r} of record {index}", json.dumps(records).encode()
        value = rng.choice(ODD_VALUES)
        records[index][key] = value
        return f"record {index}: {key}={value!r}", json.dumps(records).encode()
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return f"truncate at byte {cut}", data[:cut]
    if kind == "duplicate":
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 40))
        return f"duplicate bytes {start}:{end}", data[:end] + data[start:end] + data[end:]
    if kind == "garble":
        garbled = bytearray(data)
        places = [rng.randrange(len(data)) for _ in range(rng.randint(1, 4))]
        for place in places:
            garbled[place] = rng.randrange(256)
        return f"garble bytes {places}", bytes(garbled)
    top = rng.choice(['{"a": 1}', "null", "42", "[[]]", '[{"instruction": "q", "output": "a"}]', "[" * 3000])
    return f"replace with {top[:20]!r}", top.encode()


def assert_clean_or_loadable(inputs: Inputs, capsys, what: str) -> str:
    """The command must either stop with one clean error line, or pass every check, in which case what training
    and evaluation read after the model loads must load without error too."""
    try:
        code = main(["train", str(inputs.config)])
    except ModelLoaded:
        capsys.readouterr()
        config = load_config(inputs.config)
        for record in load_mixture(parse_sources(resolve_train_files(config.data.train_files))):
            format_prompt(record, config.data.template)
        for task, items in load_test_items(resolve_test_files(config.evaluation.test_files), None).items():
            for _, record in items:
                assert record.get("answer"), what
                if "cloze" in config.evaluation.protocols:
                    cloze_prompt_and_options(TASKS[task], record)
        return "passed"
    except Exception as error:  # any other exception type escaped main: a traceback for the user
        pytest.fail(f"{what}: {type(error).__name__}: {error}")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, f"{what}: {err}"
    lines = err.strip().splitlines()
    assert lines[0].startswith("moelora: error:") and all(line.startswith("  ") for line in lines[1:]), what
    return f"refused: {lines[0]}"


def test_fuzz_damaged_data_files_are_refused_cleanly_or_load(inputs: Inputs, capsys) -> None:
    rng = random.Random(20240611)
    train_text, test_text = inputs.train.read_text(), inputs.test.read_text()
    outcomes = []
    for number in range(30):
        inputs.write_train(train_text)
        inputs.write_test(test_text)
        path, text = (inputs.train, train_text) if number % 2 == 0 else (inputs.test, test_text)
        what, damaged = mutate_data(text, rng)
        path.write_bytes(damaged)
        outcomes.append(f"{path.name}: {what}: {assert_clean_or_loadable(inputs, capsys, f'{path.name}: {what}')}")
    # most damage must matter, or the fuzzing would test nothing
    assert sum("refused" in outcome for outcome in outcomes) >= 15, outcomes


def leaf_paths(values: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(values, dict):
        for key, value in values.items():
            paths += leaf_paths(value, (*prefix, key))
    return paths


def test_fuzz_damaged_configs_are_refused_cleanly_or_run(inputs: Inputs, capsys, monkeypatch) -> None:
    monkeypatch.chdir(inputs.folder)  # a deleted output_dir falls back to the relative default: keep it here
    rng = random.Random(7)
    paths = leaf_paths(inputs.values)
    outcomes = []
    for _ in range(24):
        values = copy.deepcopy(inputs.values)
        path = rng.choice(paths)
        *parents, leaf = path
        node = values
        for part in parents:
            node = node[part]
        operation = rng.choice(("delete", "retype", "retype", "add"))
        if operation == "delete":
            del node[leaf]
            what = f"delete {'.'.join(map(str, path))}"
        elif operation == "retype":
            node[leaf] = rng.choice(ODD_VALUES)
            what = f"{'.'.join(map(str, path))}={node[leaf]!r}"
        else:
            node[f"{leaf}_typo"] = 1
            what = f"add {leaf}_typo"
        inputs.write_config(values)
        outcomes.append(f"{what}: {assert_clean_or_loadable(inputs, capsys, what)}")
    assert sum("refused" in outcome for outcome in outcomes) >= 12, outcomes

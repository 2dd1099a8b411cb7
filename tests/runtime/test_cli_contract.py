"""The contract every CLI keeps (molmo-export, molmo-verify, molmo-run, molmo-bench,
python -m molmo_calibration): help with a default for every option, a bad value is one
argparse-style line and exit 2, an anticipated error is one line and exit 2, an unexpected one is
one line that points at --debug, and a torch-needing command in a torch-free install names the
extra to install. Runs in both environments (the torch-free one runs the commands for real)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from molmo_runtime.cli_common import describe, one_line, run_main
from molmo_runtime.errors import ArtifactError, InputError
from tests.conftest import REPO


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from molmo_bench.cli import build_parser as bench
    from molmo_calibration.__main__ import build_parser as calibration
    from molmo_export.cli import _export_parser, _verify_parser
    from molmo_runtime.cli import build_parser as run

    return {"molmo-run": run(), "molmo-bench": bench(), "molmo-export": _export_parser(),
            "molmo-verify": _verify_parser(), "python -m molmo_calibration": calibration()}


def _mains() -> dict[str, Callable[[list[str]], int]]:
    from molmo_bench.cli import main as bench
    from molmo_calibration.__main__ import main as calibration
    from molmo_export.cli import main_export, main_verify
    from molmo_runtime.cli import main as run

    return {"molmo-run": run, "molmo-bench": bench, "molmo-export": main_export,
            "molmo-verify": main_verify, "python -m molmo_calibration": calibration}


@pytest.mark.parametrize("prog", ["molmo-run", "molmo-bench", "molmo-export", "molmo-verify",
                                  "python -m molmo_calibration"])
def test_every_option_has_help_with_its_default(prog: str) -> None:
    missing = []
    for action in _parsers()[prog]._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        text = (action.help or "").lower()
        if "default" not in text and "required" not in text:
            missing.append("/".join(action.option_strings))
    assert not missing, f"{prog}: options without help naming their default: {missing}"


BAD_VALUES = [
    ("molmo-run", ["--temperature", "nan"], "--temperature"),
    ("molmo-run", ["--temperature", "-1"], "--temperature"),
    ("molmo-run", ["--temperature", "inf"], "--temperature"),
    ("molmo-run", ["--temperature", "1", "--top-p", "0"], "--top-p"),
    ("molmo-run", ["--temperature", "1", "--top-p", "2"], "--top-p"),
    ("molmo-run", ["--temperature", "1", "--top-k", "0"], "--top-k"),
    ("molmo-run", ["--temperature", "1", "--top-k", "2.5"], "--top-k"),
    ("molmo-run", ["--temperature", "1", "--seed", "-1"], "--seed"),
    ("molmo-run", ["--max-new-tokens", "-1"], "--max-new-tokens"),
    ("molmo-run", ["--max-new-tokens", "x"], "--max-new-tokens"),
    ("molmo-run", ["--top-k", "5"], "--top-k only apply when sampling"),
    ("molmo-run", ["--seed", "3", "--top-p", "0.9"], "--top-p/--seed only apply"),
    ("molmo-run", ["--backend", "cuda"], "--backend"),
    ("molmo-bench", ["--runs", "0"], "--runs"),
    ("molmo-bench", ["--threads", "-2"], "--threads"),
    ("molmo-bench", ["--contexts", "0,5"], "--contexts"),
    ("molmo-export", ["--max-crops", "0"], "--max-crops"),
    ("molmo-export", ["--max-seq-len", "-5"], "--max-seq-len"),
    ("molmo-verify", ["--greedy-tokens", "-1"], "--greedy-tokens"),
    ("python -m molmo_calibration", ["--target", "ort-int8", "--max-samples", "0"],
     "--max-samples"),
]


@pytest.mark.parametrize("prog, args, words", BAD_VALUES)
def test_bad_value_is_one_argparse_line_and_exit_2(prog: str, args: list[str], words: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    positional = {"molmo-run": ["ART", "--prompt", "hi"], "molmo-bench": ["ART"],
                  "molmo-export": [], "molmo-verify": ["ART"],
                  "python -m molmo_calibration": ["SRC", "OUT"]}[prog]
    with pytest.raises(SystemExit) as exit_:
        _mains()[prog](positional + args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{prog}: error: ") and words in err[-1], err
    assert all(line.startswith("usage:") or line.startswith(" ") for line in err[:-1]), err


# -- how a command ends ------------------------------------------------------------------------

def test_anticipated_errors_are_one_line_exit_2() -> None:
    assert describe(InputError("bad --image")) == (2, "error: bad --image")
    status, line = describe(ArtifactError("artifact x does not match:\n  a: missing\n  b: "
                                          "size 3 != 4\nre-export it"))
    assert status == 2 and line == "error: artifact x does not match: a: missing; b: size 3 != " \
                                   "4; re-export it"
    status, line = describe(FileNotFoundError(2, "No such file or directory", "out/x.json"))
    assert (status, line) == (2, "error: No such file or directory: out/x.json")
    status, line = describe(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert status == 2 and "[export]" in line and "pip install" in line


def test_unexpected_error_is_one_line_with_the_way_to_the_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    def boom() -> int:
        raise RuntimeError("kernel failed\nsecond line")

    assert run_main("molmo-run", boom) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("molmo-run: internal error: RuntimeError: "
                                                   "kernel failed; second line")
    assert "rerun with --debug" in err
    with pytest.raises(RuntimeError):
        run_main("molmo-run", boom, debug=True)  # --debug: the traceback itself


def test_one_line_keeps_single_lines() -> None:
    assert one_line("plain") == "plain" and one_line("") == ""


# -- torch-needing commands in a runtime-only install ------------------------------------------

RUNTIME_VENV = REPO / ".venv-runtime" / "bin"
TORCH_COMMANDS = [
    (["molmo-export", "--model", "demo", "--out", "{tmp}/out"], "molmo-export"),
    (["molmo-verify", "{tmp}/art"], "molmo-verify"),
    (["molmo-bench", "{tmp}/art", "--compare-torch"], "molmo-bench"),
]


@pytest.mark.parametrize("command, prog", TORCH_COMMANDS)
def test_torch_commands_name_the_extra_in_a_runtime_only_install(
        command: list[str], prog: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        exe = Path(sys.executable).parent  # this is the torch-free environment
    elif (REPO / ".venv-runtime" / ".installed").exists():
        exe = RUNTIME_VENV
    else:
        pytest.skip("no torch-free environment here: make .venv-runtime/.installed")
    argv = [str(exe / command[0])] + [a.format(tmp=tmp_path) for a in command[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: torch is not installed")
    assert f"pip install '{REPO}[export]'" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


# -- molmo-run on the demo artifact --------------------------------------------------------------

def _molmo_run(*args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "molmo_runtime.cli", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("molmo-run: error: ") and words in lines[0], \
        proc.stderr


def test_json_stream_is_json_lines_with_the_result_last(demo_artifact: Path) -> None:
    proc = _molmo_run(str(demo_artifact), "--prompt", "Describe this image.",
                      "--max-new-tokens", "12", "--json", "--stream")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    *pieces, last = events
    assert all(e["event"] == "text" for e in pieces) and last["event"] == "result"
    assert "".join(e["text"] for e in pieces) == last["text"]
    plain = _molmo_run(str(demo_artifact), "--prompt", "Describe this image.",
                       "--max-new-tokens", "12", "--json")
    assert json.loads(plain.stdout)["text"] == last["text"]


def test_prompt_that_is_not_utf8_is_one_line(demo_artifact: Path) -> None:
    proc = subprocess.run([sys.executable.encode(), b"-m", b"molmo_runtime.cli",
                           str(demo_artifact).encode(), b"--prompt", b"caf\xe9?"],
                          capture_output=True, cwd=REPO, timeout=300)
    _assert_one_line_error(subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()),
        "lone surrogate")


@pytest.fixture()
def artifact_copy(demo_artifact: Path, tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(demo_artifact, art)
    return art


def _edit_manifest(art: Path, edit: Callable[[dict], None]) -> None:
    raw = json.loads((art / "manifest.json").read_text())
    edit(raw)
    (art / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("files"), "files must be"),
    (lambda m: m.pop("graphs"), "graphs must be"),
    (lambda m: m.pop("dims"), "dims must be"),
    (lambda m: m["dims"].update(num_layers="2"), "dims.num_layers must be"),
    (lambda m: m.update(graphs=[]), "graphs must be"),
    (lambda m: m["special_tokens"].pop("eos"), "special_tokens.eos"),
])
def test_damaged_manifest_is_one_line(artifact_copy: Path, edit: Callable[[dict], None],
                                      words: str) -> None:
    _edit_manifest(artifact_copy, edit)
    _assert_one_line_error(_molmo_run(str(artifact_copy), "--prompt", "hi"), words)


def test_absurd_max_seq_len_is_refused_before_allocating(artifact_copy: Path) -> None:
    def huge(m: dict) -> None:
        m["max_seq_len"] = m["dims"]["max_seq_len"] = 10**9

    _edit_manifest(artifact_copy, huge)
    proc = _molmo_run(str(artifact_copy), "--prompt", "hi", "--max-new-tokens", "4")
    _assert_one_line_error(proc, "GiB")
    assert "max_seq_len 1000000000" in proc.stderr and "--max-seq-len" in proc.stderr

"""Bad input gets one clear line and exit 2, and nothing is lost; never a traceback.

One test (or parametrized group) per input an independent tester found ending in a traceback
or silently accepted. A truly unexpected error (a bug) ends in one line naming a log file
that holds the traceback, and exit 1.
"""

import json
import os
import shutil
import stat
import tempfile

import pytest
import torch

import fedllm
from fedllm.cli import main
from fedllm.config import ConfigError

TINY = ["model=tiny", "federation.rounds=1"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, *needles, exit_code=2, prefix="fedllm: error:"):
    """Exit code 2, stderr exactly one line starting with the prefix, naming every needle."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert code == exit_code
    return lines[0]


def no_gpu_device() -> str:
    """A CUDA device this machine does not have: cuda without any GPU, else one past the last."""
    if not torch.cuda.is_available():
        return "cuda"
    return f"cuda:{torch.cuda.device_count()}"


# --------------------------------------------------------------------------- 1. generate

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from test_export import make_run_dir

    return make_run_dir(tmp_path_factory.mktemp("bad_input") / "lora", "lora")[0]


@pytest.mark.parametrize("extra,needles", [
    (["--prompt", ""], ["--prompt", "empty"]),
    (["--prompt", "hi", "--prompt", ""], ["prompt 2 is empty"]),
    (["--prompt", "hi", "--device", "banana"], ["--device", "banana"]),
    (["--prompt", "hi", "--device", "cudafoo"], ["--device", "cudafoo"]),
    (["--prompt", "hi", "--device", no_gpu_device()], ["--device", no_gpu_device()]),
    (["--prompt", "hi", "--sample", "--seed", "-1"], ["--seed"]),
    (["--prompt", "bad \udcff byte"], ["--prompt", "UTF-8"]),
])
def test_generate_bad_input_one_line(lora_run, capsys, extra, needles):
    code, out, err = run_cli(capsys, "generate", lora_run, *extra, "--max-new-tokens", "2")
    one_line_error(code, err, *needles)
    assert out == ""


@pytest.mark.parametrize("prompt", ["[/]", "[bold]x", "[red]a[/blue] [link=x]y"])
def test_generate_prints_prompts_as_text_not_markup(lora_run, capsys, prompt):
    code, out, err = run_cli(capsys, "generate", lora_run, "--prompt", prompt,
                             "--max-new-tokens", "2")
    assert code == 0, err
    assert "Traceback" not in err
    assert prompt.split()[0] in out  # printed as typed, brackets and all


def test_console_prints_user_text_without_markup():
    """Every table and line of the CLI goes through _console(): run directories, sweep values
    and error rows are user text too."""
    from fedllm.cli import _bold_command, _console

    console = _console()
    with console.capture() as cap:
        console.print(_bold_command("fedllm simulate: run → /tmp/[/]odd[bold]dir"))
    assert cap.get().strip() == "fedllm simulate: run → /tmp/[/]odd[bold]dir"


# --------------------------------------------------------------------------- 2. model.device

def test_device_name_refused_at_compose(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", *TINY, "model.device=cudafoo",
                           f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, "model.device", "cudafoo")
    assert not (tmp_path / "run").exists()


def test_cuda_device_this_machine_lacks_refused_before_the_run(capsys, tmp_path):
    device = no_gpu_device()
    code, _, err = run_cli(capsys, "simulate", *TINY, f"model.device={device}",
                           f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, "model.device", device)
    assert not (tmp_path / "run").exists()


def test_cuda_device_refused_for_the_audit_too(capsys, tmp_path):
    device = no_gpu_device()
    code, _, err = run_cli(capsys, "audit", *TINY, f"model.device={device}",
                           f"run.dir={tmp_path / 'audit'}")
    one_line_error(code, err, "model.device", device)


def test_a_run_config_with_cuda_still_loads_without_a_gpu(tmp_path):
    """The GPU check is a preflight check, not validation: a run made on a GPU machine still
    reports and exports on a laptop."""
    from fedllm.config import compose, load_run_config, to_yaml

    cfg = compose(["model=tiny", "model.device=cuda:3"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_run_config(tmp_path / "config.yaml").model.device == "cuda:3"


# --------------------------------------------------------------------------- 3. run.seed

@pytest.mark.parametrize("override", [
    "run.seed=1e23", "run.seed=1.5", "run.seed=-1", "run.seed=99999999999999999999999",
    "run.seed=4294967296", "run.seed=abc", "audit.seed=-3",
])
def test_bad_seed_one_line(capsys, tmp_path, override):
    code, _, err = run_cli(capsys, "simulate", *TINY, override, f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, override.split("=")[0])
    assert not (tmp_path / "run").exists()


def test_largest_seed_accepted():
    assert fedllm.compose(["model=tiny", "run.seed=4294967295"]).run.seed == 2**32 - 1


# --------------------------------------------------------------------------- 4. JSONL data

@pytest.mark.parametrize("name,line,needle", [
    ("surrogate", '{"text": "a\\ud800b"}', "surrogate"),
    ("prompt_surrogate", '{"prompt": "hi", "response": "\\udfff"}', "'response'"),
    ("deep", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
    ("digits", '{"text": "ok", "n": ' + "9" * 5000 + "}", "digits"),
])
def test_unreadable_jsonl_record_one_line_naming_file_and_line(capsys, tmp_path, name, line,
                                                               needle):
    data = tmp_path / "data"
    data.mkdir()
    (data / f"{name}.jsonl").write_text('{"text": "a fine first record"}\n' + line + "\n")
    code, _, err = run_cli(capsys, "simulate", *TINY, "data=jsonl", f"data.path={data}",
                           f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, f"{data / name}.jsonl:2", needle)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 5. ledger_dir

def test_ledger_dir_that_is_a_file_refused(capsys, tmp_path):
    ledger = tmp_path / "ledger"
    ledger.write_text("not a directory\n")
    code, _, err = run_cli(capsys, "simulate", *TINY, f"privacy.ledger_dir={ledger}",
                           f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, "privacy.ledger_dir", str(ledger), "not a directory")
    assert ledger.read_text() == "not a directory\n"
    assert not (tmp_path / "run").exists()


def test_ledger_dir_under_a_file_refused(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "simulate", *TINY, f"privacy.ledger_dir={blocker}/ledger",
                           f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, "privacy.ledger_dir", str(blocker))


# --------------------------------------------------------------------------- 6. certs

@pytest.mark.parametrize("extra,needles", [
    (["--days", "-5"], ["--days", "-5"]),
    (["--days", "0"], ["--days"]),
    (["--days", "99999999"], ["--days"]),
    (["--server-host", "héllo.example"], ["héllo.example", "xn--hllo-bpa.example"]),
    (["--server-host", "a b"], ["'a b'"]),
])
def test_certs_bad_arguments_one_line_and_nothing_written(capsys, tmp_path, extra, needles):
    out = tmp_path / "certs"
    args = ["--server-host", "fed.example"] if "--server-host" not in extra else []
    code, _, err = run_cli(capsys, "certs", out, *args, *extra)
    one_line_error(code, err, *needles)
    assert not out.exists()


def test_certs_keeps_the_mode_of_an_existing_directory(capsys, tmp_path):
    existing = tmp_path / "shared"
    existing.mkdir()
    existing.chmod(0o755)
    code, _, err = run_cli(capsys, "certs", existing, "--server-host", "fed.example")
    assert code == 0, err
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    assert stat.S_IMODE((existing / "ca.key").stat().st_mode) == 0o600
    made = tmp_path / "new" / "certs"
    code, _, err = run_cli(capsys, "certs", made, "--server-host", "fed.example")
    assert code == 0, err
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["ca.key", "ca.crt"])
def test_certs_corrupt_existing_ca_one_line(capsys, tmp_path, name):
    out = tmp_path / "certs"
    out.mkdir()
    (out / "ca.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
    (out / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    if name == "ca.crt":  # a good key, a bad certificate
        shutil.rmtree(out)
        assert main(["certs", str(out), "--server-host", "fed.example"]) == 0
        (out / "ca.crt").write_text("garbage\n")
        capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(capsys, "certs", out, "--server-host", "fed.example")
    one_line_error(code, err, str(out / name))
    assert sorted(p.name for p in out.iterdir()) == before


def test_certs_corrupt_node_key_one_line(capsys, tmp_path):
    out = tmp_path / "certs"
    assert main(["certs", str(out), "--server-host", "fed.example"]) == 0
    (out / "node-0.key").write_text("garbage\n")
    capsys.readouterr()
    code, _, err = run_cli(capsys, "certs", out, "--server-host", "fed.example", "--nodes", "1")
    one_line_error(code, err, str(out / "node-0.key"))


# --------------------------------------------------------------------------- 7. connection

@pytest.mark.parametrize("content,needle", [
    (b"garbage = = \n", "not valid TOML"),
    (b"\xff\xfe[superlink]\n", "not UTF-8"),
    (b"superlink = 3\n", "not a table"),
])
def test_connection_with_an_unreadable_flwr_config_one_line(capsys, tmp_path, monkeypatch,
                                                            content, needle):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_bytes(content)
    code, _, err = run_cli(capsys, "connection", "fed", "--address", "127.0.0.1:9093",
                           "--root-certificates", tmp_path / "ca.crt")
    one_line_error(code, err, str(tmp_path / "config.toml"), needle)
    assert (tmp_path / "config.toml").read_bytes() == content  # nothing lost


def test_launch_with_a_non_utf8_flwr_config_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_bytes(b"\xff\xfe")
    code, _, err = run_cli(capsys, "launch", "fed", *TINY, f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, str(tmp_path / "config.toml"), "not UTF-8")
    assert not (tmp_path / "run").exists()


def test_connection_flwr_home_is_a_file_one_line(capsys, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("x")
    monkeypatch.setenv("FLWR_HOME", str(home))
    code, _, err = run_cli(capsys, "connection", "fed", "--address", "127.0.0.1:9093",
                           "--root-certificates", tmp_path / "ca.crt")
    one_line_error(code, err, "cannot write", str(home))


# --------------------------------------------------------------------------- 8. unwritable

@pytest.fixture
def run_copy(lora_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(lora_run, path)
    return path


def test_report_that_cannot_be_written_one_line(capsys, run_copy):
    """A real write failure that also happens as root: the report's file is a directory."""
    (run_copy / "privacy_report.html").mkdir()
    (run_copy / "privacy_report.html" / "keep").write_text("x")
    code, _, err = run_cli(capsys, "report", run_copy)
    one_line_error(code, err, "privacy_report.html")
    assert (run_copy / "privacy_report.html" / "keep").read_text() == "x"
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".privacy_report")]


def test_report_permission_error_one_line(capsys, run_copy, monkeypatch):
    """What a read-only run directory raises (tests run as root, where chmod does not)."""
    import fedllm.report as report

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(report, "atomic_write_text", refuse)
    code, _, err = run_cli(capsys, "report", run_copy)
    one_line_error(code, err, "Permission denied", str(run_copy))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_report_read_only_run_dir_one_line(capsys, run_copy):
    run_copy.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "report", run_copy)
    finally:
        run_copy.chmod(0o755)
    one_line_error(code, err, str(run_copy))


@pytest.mark.parametrize("option,name", [("--merged", "out"), ("--gguf", "out.gguf")])
def test_export_to_a_path_under_a_file_one_line(capsys, lora_run, tmp_path, option, name):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "export", lora_run, option, blocker / name)
    one_line_error(code, err, option, str(blocker))
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_export_into_a_read_only_directory_one_line(capsys, lora_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        code, _, err = run_cli(capsys, "export", lora_run, "--merged", locked / "out")
    finally:
        locked.chmod(0o755)
    one_line_error(code, err, str(locked), "not writable")


# --------------------------------------------------------------------------- 9. +key

@pytest.mark.parametrize("override,key", [
    ("+foo=1", "foo"), ("+model.foo=1", "model.foo"), ("++run.bar=x", "run.bar"),
    ("+privacy.example.typo=3", "privacy.example.typo"),
])
def test_appended_unknown_key_refused(capsys, tmp_path, override, key):
    code, _, err = run_cli(capsys, "simulate", *TINY, override, f"run.dir={tmp_path / 'run'}")
    line = one_line_error(code, err, key, "not a fedllm config key")
    assert f"error: {key}:" in line
    assert not (tmp_path / "run").exists()


def test_appended_keys_of_the_schema_still_compose():
    cfg = fedllm.compose(["model=tiny", "++federation.rounds=2"])
    assert cfg.federation.rounds == 2


# --------------------------------------------------------------------------- 10. accountant

def test_accountant_json_is_valid_json_when_epsilon_is_infinite(capsys):
    """No noise: ε = ∞, written as null (JSON has no infinity; `Infinity` is not JSON)."""
    code, out, err = run_cli(capsys, "accountant", "--sample-rate", "1", "--noise-multiplier",
                             "0", "--steps", "1", "--delta", "1e-5", "--json")
    assert code == 0, err
    assert "Infinity" not in out

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    doc = json.loads(out, parse_constant=refuse)
    assert doc["epsilon"] is None and doc["noise_multiplier"] == 0.0


# --------------------------------------------------------------------------- 11. Python API

@pytest.mark.parametrize("call", [
    lambda: fedllm.sweep("model=tiny"),
    lambda: fedllm.sweep(42),
    lambda: fedllm.sweep(["model=tiny", 3]),
    lambda: fedllm.simulate(42),
    lambda: fedllm.simulate("model=tiny"),
    lambda: fedllm.simulate({"model": "tiny"}),
    lambda: fedllm.compose(42),
])
def test_api_wrong_argument_type_is_a_one_line_config_error(call):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert "overrides" in message


def test_api_sweep_of_one_string_names_the_fix():
    with pytest.raises(ConfigError, match=r"\['model=tiny'\]"):
        fedllm.sweep("model=tiny")


# --------------------------------------------------------------------------- 12. a bug

def test_unexpected_error_one_line_naming_a_log_with_the_traceback(capsys, tmp_path,
                                                                   monkeypatch):
    import fedllm.cli as cli

    def broken(args):
        raise RuntimeError("something\nbroke [/]")

    monkeypatch.setattr(cli, "cmd_report", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, _, err = run_cli(capsys, "report", tmp_path)
    line = one_line_error(code, err, "RuntimeError: something broke [/]", str(tmp_path),
                          exit_code=1, prefix="fedllm: internal error:")
    (log,) = tmp_path.glob("fedllm-crash-*.log")
    assert str(log) in line
    text = log.read_text()
    assert "Traceback" in text and "in broken" in text and "RuntimeError" in text


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt, 130), (SystemExit, None)])
def test_interrupts_and_exits_are_not_internal_errors(capsys, tmp_path, monkeypatch, exc,
                                                      code):
    import fedllm.cli as cli

    def stop(args):
        raise exc()

    monkeypatch.setattr(cli, "cmd_report", stop)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if code is None:
        with pytest.raises(SystemExit):
            main(["report", str(tmp_path)])
    else:
        assert main(["report", str(tmp_path)]) == code
    assert "internal error" not in capsys.readouterr().err
    assert not list(tmp_path.glob("fedllm-crash-*.log"))

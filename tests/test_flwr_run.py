"""`flwr run .`: the project is a Flower app that runs on Flower's local simulation runtime,
and takes the same config keys as `fedllm simulate` through `--run-config`."""

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedllm.config import ConfigError, compose, from_yaml, run_config_keys, run_config_overrides
from fedllm.protocol import CONFIG_KEY

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "experiments"))
from process_tree import process_trees, stop  # noqa: E402


def declared_run_config() -> dict:
    """[tool.flwr.app.config] as Flower reads it: the defaults of every run."""
    from flwr.common.config import flatten_dict

    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


def flower_run_config(*cli_args: str) -> dict:
    """What the ServerApp gets for `flwr run . --run-config ARG...`: Flower's own parsing of
    the arguments, fused with the declared defaults (Flower refuses undeclared keys)."""
    from flwr.common.config import fuse_dicts, parse_config_args

    return fuse_dicts(declared_run_config(), parse_config_args(list(cli_args)))


def test_pyproject_declares_every_config_key_and_no_values():
    declared = declared_run_config()
    expected = {CONFIG_KEY, *run_config_keys()}
    assert sorted(set(declared) - expected) == [] and sorted(expected - set(declared)) == []
    assert {v for v in declared.values()} == {""}  # values live in conf/ only


def test_run_config_keys_become_the_same_hydra_overrides_as_the_cli():
    # One --run-config string: Flower merges several only section by section (a later
    # `privacy.example...` would drop an earlier `privacy.delta`).
    run_config = flower_run_config('model="tiny" federation.rounds=1 privacy.delta=1e-6 '
                                   'privacy.example.enabled=false data.plays="[hamlet,macbeth]" '
                                   '"model.lora.r"=2 run.dir="null"')
    overrides = run_config_overrides(run_config, ignore=(CONFIG_KEY,))
    assert sorted(overrides) == sorted([
        "model=tiny", "federation.rounds=1", "privacy.delta=1e-06",
        "privacy.example.enabled=false", "data.plays=[hamlet,macbeth]", "model.lora.r=2",
        "run.dir=null"])
    assert compose(overrides) == compose(["model=tiny", "federation.rounds=1", "privacy.delta=1e-6",
                                          "privacy.example.enabled=false", "model.lora.r=2",
                                          "data.plays=[hamlet,macbeth]"])


@pytest.mark.parametrize("arg,message", [
    ('model.adapter="ia3"', "model.adapter: Invalid value 'ia3', expected one of "
                            "[lora, prompt_tuning]"),
    ("federation.rounds=0", "federation.rounds: must be a positive integer, got 0"),
    ('federation.rounds="many"', "federation.rounds: Value 'many' of type 'str' could not be "
                                 "converted to Integer"),
])
def test_bad_run_config_value_is_one_config_error_line(arg, message):
    from fedllm.server.app import config_from_run_config

    with pytest.raises(ConfigError) as info:
        config_from_run_config(flower_run_config(arg))
    assert str(info.value) == message


def test_undeclared_key_is_refused_by_flower_naming_the_key():
    with pytest.raises(ValueError, match="federation.roundz"):
        flower_run_config("federation.roundz=1")


def test_server_fills_run_dir_and_id_and_saves_the_config(tmp_path, monkeypatch):
    from fedllm.server.app import config_from_run_config

    monkeypatch.chdir(tmp_path)
    cfg = from_yaml(config_from_run_config(flower_run_config('model="tiny"')))
    run_dir = Path(cfg.run.dir)
    assert run_dir.parent == tmp_path / "runs" and run_dir.is_absolute()
    assert len(cfg.run.id) == 16 and cfg.model.name == "tiny"
    assert from_yaml((run_dir / "config.yaml").read_text()) == cfg


def test_launch_config_is_taken_whole_and_alone():
    from fedllm.protocol import encode_config
    from fedllm.server.app import config_from_run_config

    text = "run:\n  seed: 3\n"
    assert config_from_run_config({CONFIG_KEY: encode_config(text), "model": ""}) == text
    with pytest.raises(ConfigError, match="give no other keys"):
        config_from_run_config({CONFIG_KEY: encode_config(text), "model": "tiny"})


# ----------------------------------------------------------------------------- real `flwr run`

def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves the local SuperLink it started running, detached. Stop the one this
    test started (its log file is inside our FLWR_HOME) and whatever it spawned."""
    stop(process_trees("flower-superlink.*" + re.escape(str(flwr_home))))


@pytest.fixture
def flwr_env(tmp_path):
    """An isolated, offline Flower home with the local SuperLink on free ports."""
    home = tmp_path / "flwr-home"
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", FLWR_DISABLE_UPDATE_CHECK="1",
               # Flower 1.42 would otherwise `uv sync` the app's dependencies into a fresh
               # environment per run (downloads torch; fails offline): use this environment.
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=_free_port(),
               FLWR_LOCAL_CONTROL_API_PORT=_free_port())
    yield env
    _stop_local_superlink(home)


def flwr_run(env, cwd, *run_config, supernodes=2, timeout=900):
    env = dict(env, COLUMNS="400")  # Flower's error boxes: one line per message
    command = ["flwr", "run", str(PROJECT), "--stream",
               "--federation-config", f"num-supernodes={supernodes}"]
    for arg in run_config:
        command += ["--run-config", arg]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_flwr_run_trains_the_tiny_model_on_the_local_simulation_runtime(tmp_path, flwr_env):
    proc = flwr_run(flwr_env, tmp_path, 'model="tiny" federation.rounds=1 '
                    "federation.num_clients=2 federation.clients_per_round=2")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    runs = list((tmp_path / "runs").iterdir())  # run.dir default: runs/<timestamp>, server side
    assert len(runs) == 1, log[-4000:]
    run_dir = runs[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["num_clients"] == 2
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert 0 < report["example_level"]["max_epsilon"] <= 8.0
    assert from_yaml((run_dir / "config.yaml").read_text()).model.name == "tiny"

    # A bad value stops the run with the one-line message, before any training.
    bad = flwr_run(flwr_env, tmp_path, 'model.adapter="ia3"')
    assert ("model.adapter: Invalid value 'ia3', expected one of [lora, prompt_tuning]"
            in bad.stdout + bad.stderr), (bad.stdout + bad.stderr)[-4000:]
    # An undeclared key never reaches the app: Flower refuses the run ("Invalid run
    # configuration", exit 1); only the local SuperLink's log names the key.
    typo = flwr_run(flwr_env, tmp_path, "federation.roundz=1")
    assert typo.returncode != 0 and "Invalid run configuration" in typo.stdout + typo.stderr
    superlink_log = Path(flwr_env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
    assert "Key 'federation.roundz' is not present" in superlink_log.read_text()
    assert len(list((tmp_path / "runs").iterdir())) == 1  # neither made a run directory

    # One SuperNode per client: any other count is refused with both fixes.
    mismatch = flwr_run(flwr_env, tmp_path, 'model="tiny" federation.num_clients=2 '
                        "federation.clients_per_round=2", supernodes=3)
    assert ("federation.num_clients: this simulation has 3 SuperNodes but the data has 2 "
            "clients" in mismatch.stdout + mismatch.stderr), (mismatch.stdout + mismatch.stderr)[-4000:]

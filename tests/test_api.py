"""The typed Python API: fedllm.compose / fedllm.simulate / RunResult."""

import json
import subprocess
import sys

import numpy as np
import pytest

import fedllm
from fedllm.config import ConfigError, from_yaml

TINY_RUN = ["model=tiny", "federation.rounds=1", "federation.num_clients=2",
            "federation.clients_per_round=2"]


def test_import_fedllm_is_cheap_and_exports_the_api_lazily():
    code = ("import sys, fedllm\n"
            "heavy = [m for m in ('torch', 'flwr', 'ray', 'hydra', 'omegaconf', 'transformers')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "api = {'compose', 'simulate', 'sweep', 'RunResult', 'ConfigError', 'load_adapter'}\n"
            "assert api <= set(dir(fedllm)), dir(fedllm)\n"
            "from fedllm import ConfigError, RunResult, compose, simulate, sweep\n"
            "assert issubclass(ConfigError, ValueError) and RunResult.__module__ == 'fedllm.api'\n"
            "assert 'torch' not in sys.modules  # the API itself imports torch only to run\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedllm.nope  # noqa: B018


def test_compose_returns_a_validated_typed_config():
    cfg = fedllm.compose(["model=tiny", "federation.rounds=2"])
    assert isinstance(cfg, fedllm.Config)
    assert cfg.model.name == "tiny" and cfg.federation.rounds == 2


@pytest.mark.parametrize("overrides,message", [
    (["nope=1"], "nope"),
    (["federation.rounds=-1"], "federation.rounds"),
    (["train.lr=abc"], "train.lr"),
    (["model=nosuchmodel"], "nosuchmodel"),
    ("model=tiny", "give a list of strings"),
    ([3], "every override is a string"),
    (["privacy.example.target_epsilon=4,8"], "fedllm simulate -m"),
])
def test_compose_errors_raise_config_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        fedllm.compose(overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)  # one readable line


def test_simulate_checks_a_config_edited_after_compose(tmp_path):
    cfg = fedllm.compose(["model=tiny", f"run.dir={tmp_path / 'run'}"])
    cfg.train.local_steps = 0
    with pytest.raises(ConfigError, match="train.local_steps"):
        fedllm.simulate(cfg)
    cfg.train.local_steps = "many"  # wrong type: caught, not passed to training
    with pytest.raises(ConfigError, match="local_steps"):
        fedllm.simulate(cfg)
    assert not (tmp_path / "run").exists()


def test_simulate_refuses_infeasible_runs_before_training(tmp_path):
    with pytest.raises(ConfigError, match="privacy.example.target_epsilon"):
        fedllm.simulate([*TINY_RUN, "privacy.example.target_epsilon=1e-9",
                         f"run.dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_run_result_of_a_directory_without_a_run(tmp_path):
    with pytest.raises(fedllm.RunError, match="no finished run"):
        fedllm.RunResult.from_run_dir(tmp_path)


def test_simulate_returns_a_result_matching_the_files_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    run_dir = tmp_path / "run"
    cfg = fedllm.compose([*TINY_RUN, f"run.dir={run_dir}"])
    result = fedllm.simulate(cfg)

    assert cfg.run.id is None  # the caller's config is not mutated; the run got its own id
    assert isinstance(result, fedllm.RunResult)
    assert result.run_dir == run_dir.resolve() and result.config.run.id
    assert result.config.federation.num_clients == 2
    assert result.summary == json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.rounds == rows and [r["round"] for r in rows] == [1]
    assert result.privacy == json.loads((run_dir / "privacy_report.json").read_text())
    assert result.config_path == run_dir.resolve() / "config.yaml"
    assert result.config == from_yaml(result.config_path.read_text())
    assert result.report_json.is_file() and result.report_html.is_file()
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert result.final_perplexity == pytest.approx(rows[-1]["perplexity"])
    assert result.final_eval_loss == pytest.approx(rows[-1]["eval_loss"])
    assert result.epsilon_max == pytest.approx(result.privacy["example_level"]["max_epsilon"])
    assert 0 < result.epsilon_max <= 8.0
    assert result.wall_seconds > 0
    again = fedllm.RunResult.from_run_dir(run_dir)
    assert (again.summary, again.rounds, again.privacy) == (result.summary, result.rounds,
                                                            result.privacy)
    # The trained adapter comes back as a PeftModel carrying exactly the exported weights.
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.numpy import load_file

    model = fedllm.load_adapter(run_dir)
    assert isinstance(model, PeftModel)
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert saved and set(saved) == set(loaded)
    for name, value in saved.items():
        assert np.allclose(loaded[name].detach().numpy(), value), name

import json
import subprocess
import sys

import pytest

from fedllm.cli import main


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_epsilon_json(capsys):
    code, out, _ = run(["accountant", "--sample-rate", "0.01", "--noise-multiplier", "1.0",
                        "--steps", "1000", "--delta", "1e-5", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["epsilon"] == pytest.approx(1.8282, rel=5e-4)


def test_calibration_json(capsys):
    code, out, _ = run(["accountant", "--sample-rate", "0.1", "--target-epsilon", "8",
                        "--steps", "12", "--delta", "1e-5", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and 0.99 * 8 <= data["epsilon"] <= 8 and data["noise_multiplier"] > 0


def test_fixed_sampling_plain_output(capsys):
    code, out, _ = run(["accountant", "--sample-rate", "0.1", "--noise-multiplier", "1.0",
                        "--steps", "100", "--delta", "1e-6", "--sampling", "fixed",
                        "--population", "1000"], capsys)
    assert code == 0 and "15.2" in out and "rdp" in out


@pytest.mark.parametrize("args", [
    ["--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
    ["--sample-rate", "0.1", "--noise-multiplier", "-1", "--steps", "10", "--delta", "1e-5"],
    ["--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "-3", "--delta", "1e-5"],
    ["--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"],
    ["--sample-rate", "1.0", "--target-epsilon", "1e-7", "--steps", "1000", "--delta", "1e-5"],
])
def test_bad_input_one_line_error_no_traceback(args):
    proc = subprocess.run([sys.executable, "-m", "fedllm.cli", "accountant", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fedllm: error:")
    assert len(proc.stderr.strip().splitlines()) == 1

"""The documentation: the README stays short and quotes BENCHMARKS.md exactly, the site builds
strictly (broken links, missing pages and bad nav fail), and the configuration reference it
renders covers every key with the schema's own help text."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import readme_figures  # noqa: E402


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_figures_are_what_benchmarks_md_says():
    readme = (ROOT / "README.md").read_text()
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    assert readme_figures.readme_block(readme) == readme_figures.render(benchmarks), \
        "README figures differ from BENCHMARKS.md: run python experiments/readme_figures.py"


def test_a_changed_benchmark_figure_is_caught():
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    row = readme_figures.sweep_row(benchmarks, "default (prompt tuning)", "8")
    changed = benchmarks.replace(f"| {row[7]} |", "| **12%** |", 1)
    assert changed != benchmarks
    assert readme_figures.render(changed) != readme_figures.render(benchmarks)


def test_the_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                          str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    config_page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "privacy.example.target_epsilon" in config_page  # the generated reference
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()


def test_the_configuration_reference_covers_every_key_with_help():
    from omegaconf import OmegaConf

    from fedllm.config import compose, to_yaml
    from fedllm.config_reference import reference

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    cfg = compose([])
    composed = set(leaves(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))))
    rows = reference(cfg)
    assert {r.key for r in rows} == composed
    assert not [r.key for r in rows if not r.help], "every schema field needs a help comment"
    by_key = {r.key: r for r in rows}
    assert by_key["federation.sampling"].type == "one of: fixed, poisson"
    assert by_key["train.batch_size"].default == str(cfg.train.batch_size)

"""The HTML reports come from Jinja2 templates (fedllm/templates) with autoescape and one
stylesheet; the privacy report shows held-out loss per round beside ε per round."""

import fnmatch
import struct
import tomllib
from pathlib import Path

import pytest

from fedllm.config import compose, to_yaml
from fedllm.io import append_jsonl
from fedllm.report import report_templates, write_audit_files, write_reports

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "fedllm" / "templates"
EVIL = "<script>alert('x')</script>"
AUDIT = {"test": {"canaries": 100, "included": 48, "correct": 30, "guesses": 40}, "flag": True,
         "confidence": 0.95, "claimed_epsilon": 2.0, "delta": 1e-5, "method": "one_run",
         "canaries": 100, "break_mechanism": "noise",
         "claimed_mechanism": {"sample_rate": 0.1, "noise_multiplier": 1.1, "max_grad_norm": 1.0,
                               "steps": 12},
         "epsilon_lower_bound": 3.5, "accountant": "pld", "auc": 0.8,
         "citation": "Steinke et al. <i>2023</i>", "score": "loss",
         "roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.8, 1.0]}}


def hand_made_run(run_dir: Path, overrides=(), rounds=3, user=False) -> Path:
    """A run directory as a simulation leaves it, with a hostile client id."""
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(compose(["model=tiny", *overrides])))
    for rnd in range(1, rounds + 1):
        append_jsonl(run_dir / "metrics.jsonl", {
            "round": rnd, "num_clients": 2, "train_loss": 1.0, "eval_loss": 2.0 - rnd / 8,
            "perplexity": 7.0, "epsilon_example_max": 1.5 * rnd,
            "epsilon_user": 0.25 * rnd if user else None})
        for cid in ("hamlet/HAMLET", EVIL):
            append_jsonl(run_dir / "privacy_events.jsonl", {
                "kind": "release", "round": rnd, "client_id": cid, "noise_multiplier": 1.0,
                "steps": 3, "sampling": "poisson", "sample_rate": 0.1, "max_grad_norm": 1.0,
                "lifetime_epsilon": None})
        if user:
            append_jsonl(run_dir / "privacy_events.jsonl", {
                "kind": "user_release", "round": rnd, "noise_multiplier": 1.2, "clip_norm": 0.5,
                "sensitivity": 0.5, "noise": "central", "sampling": "poisson", "cohort": 2,
                "population": 10, "min_survivors": 2, "survivors": 2, "applied": True,
                "clients": ["hamlet/HAMLET", EVIL]})
    append_jsonl(run_dir / "privacy_events.jsonl", {"kind": "refused", "round": 2,
                                                    "client_id": EVIL, "reason": "<b>bad</b>"})
    return run_dir


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    run_dir = hand_made_run(tmp_path_factory.mktemp("tpl") / "run")
    write_reports(run_dir)
    return run_dir


def test_autoescape_escapes_a_hostile_client_id_everywhere(example_run):
    page = (example_run / "privacy_report.html").read_text()
    assert "<script>" not in page and "<b>bad" not in page
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert f"<td>{escaped}</td>" in page  # per-client table
    assert f"<code>{escaped}</code> — &lt;b&gt;bad&lt;/b&gt;</li>" in page  # refused list
    # The template's own markup is not escaped.
    assert '<table id="clients">' in page and "<strong>" in page and "e<sup>ε</sup>" in page


def test_one_stylesheet_for_every_page(example_run, tmp_path):
    css = report_templates()["report.css"]
    write_audit_files(tmp_path, AUDIT)  # not a run directory: a standalone audit.html
    for page in ((example_run / "privacy_report.html").read_text(),
                 (tmp_path / "audit.html").read_text()):
        assert page.count("<style>") == 1 and css.strip() in page
    assert [n for n in report_templates() if n.endswith(".css")] == ["report.css"]


def test_audit_section_is_escaped_in_both_pages(tmp_path):
    run_dir = hand_made_run(tmp_path / "run")
    write_audit_files(run_dir, AUDIT)  # a run directory: the report gains the section
    write_audit_files(tmp_path / "alone", AUDIT)
    for page in ((run_dir / "privacy_report.html").read_text(),
                 (tmp_path / "alone" / "audit.html").read_text()):
        assert '<h2 id="audit">Empirical privacy audit</h2>' in page
        assert "<strong>VIOLATION</strong>" in page and "audit.break_mechanism=noise" in page
        assert "Steinke et al. &lt;i&gt;2023&lt;/i&gt;" in page and "<i>" not in page
        assert "data:image/png;base64," in page
        assert "30 of 40 guesses correct" in page


def _png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_held_out_loss_per_round_beside_epsilon(example_run, tmp_path):
    page = (example_run / "privacy_report.html").read_text()
    # The rounds table: held-out loss and max ε in the same row, for every round.
    for rnd, loss, eps in ((1, "1.8750", "1.500"), (3, "1.6250", "4.500")):
        row = page.split(f"<tr><td>{rnd}</td>", 1)[1].split("</tr>", 1)[0]
        assert f"<td>{loss}</td>" in row and f"<td>{eps}</td>" in row
    assert "epsilon and held-out loss per round" in page
    # The figure has a held-out loss panel beside the ε panel: twice as wide as ε alone.
    bare = hand_made_run(tmp_path / "no-eval")
    (bare / "metrics.jsonl").write_text("".join(
        line.replace('"eval_loss"', '"eval_loss_unused"') + "\n"
        for line in (example_run / "metrics.jsonl").read_text().splitlines()))
    from fedllm.report import build_privacy_report, epsilon_plot, load_run

    run = load_run(bare)
    alone = epsilon_plot(build_privacy_report(run), [])
    (tmp_path / "alone.png").write_bytes(alone)
    assert _png_width(example_run / "epsilon.png") > 1.5 * _png_width(tmp_path / "alone.png")


def test_user_level_epsilon_per_round_and_in_bold(tmp_path):
    run_dir = hand_made_run(tmp_path / "run", ["privacy.user.enabled=true",
                                               "privacy.user.noise_multiplier=1.2"], user=True)
    write_reports(run_dir)
    page = (run_dir / "privacy_report.html").read_text()
    assert "<th>user ε</th>" in page and "<td>0.750</td></tr>" in page
    assert "User level: all data of any one client is protected with ε = <strong>" in page


def test_no_dp_summary(tmp_path):
    run_dir = hand_made_run(tmp_path / "run", ["privacy.example.enabled=false"])
    write_reports(run_dir)
    page = (run_dir / "privacy_report.html").read_text()
    assert "This run used <strong>no differential privacy</strong>." in page
    assert '<table id="clients">' not in page


def test_templates_ship_as_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["fedllm"]
    files = [p.relative_to(ROOT / "fedllm").as_posix() for p in TEMPLATES.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)
    # A Flower app bundle carries only these file types; the deployed ServerApp renders the
    # report from the bundle, so its templates must be one of them.
    from flwr.common.constant import FAB_INCLUDE_PATTERNS

    allowed = {p.removeprefix("**/*") for p in FAB_INCLUDE_PATTERNS if p.startswith("**/*.")}
    assert all(Path(f).suffix in allowed for f in files), files
    assert any(d.lower().startswith("jinja2") for d in project["project"]["dependencies"])


def test_a_rebuilt_model_card_keeps_the_samples_of_the_run(tmp_path):
    """`fedllm report` rebuilds the card from the run's files, samples.json included."""
    import json

    run_dir = hand_made_run(tmp_path / "run")
    (run_dir / "adapter").mkdir()
    sample = {"prompt": "My lord,", "base": " I am", "adapter": " thou art"}
    (run_dir / "samples.json").write_text(json.dumps(
        {"max_new_tokens": 24, "decoding": "greedy", "samples": [sample]}))
    write_reports(run_dir)
    card = (run_dir / "adapter" / "README.md").read_text()
    assert '- **Prompt:** "My lord,"' in card and 'adapter: " thou art"' in card
    assert card.index("## Sample generations") > card.index("## Privacy guarantee")


@pytest.mark.parametrize("overrides,named,not_named", [
    ((), "one record", "window"),
    (("data.unit=sequence",), "64-token window", "one record of a client"),
])
def test_report_and_model_card_name_the_unit(tmp_path, overrides, named, not_named):
    import json

    run_dir = hand_made_run(tmp_path / "run", overrides)
    (run_dir / "adapter").mkdir()
    write_reports(run_dir)
    unit = json.loads((run_dir / "privacy_report.json").read_text())["example_level"]["unit"]
    card = (run_dir / "adapter" / "README.md").read_text()
    html = (run_dir / "privacy_report.html").read_text()
    for text in (unit, card, html):
        assert named in text and not_named not in text
    if overrides:  # the opt-in says what it does not protect
        assert "not records" in unit and "not records" in card

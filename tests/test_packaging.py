"""Every third-party module the installed code imports is a declared dependency, and the
install adds no top-level `server` or `clients` package."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_CODE = ("fedllm", "clients", "server")  # clients/ and server/ install under fedllm


def imported_top_level_modules() -> dict[str, str]:
    found: dict[str, str] = {}
    for folder in INSTALLED_CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0] for d in project["dependencies"]}
    return {n.lower().replace("_", "-") for n in names}


def test_every_imported_third_party_module_is_declared():
    declared = declared_distributions()
    providers = md.packages_distributions()
    missing = {}
    for module, where in imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module == "fedllm":
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = (where, sorted(dists))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_install_maps_clients_and_server_into_fedllm():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"fedllm.server": "server", "fedllm.clients": "clients"}
    assert all(p == "fedllm" or p.startswith("fedllm.") for p in setuptools["packages"])
    import fedllm.clients.app
    import fedllm.server.app

    assert Path(fedllm.server.app.__file__).parent.name == "server"
    assert Path(fedllm.clients.app.__file__).parent.name == "clients"

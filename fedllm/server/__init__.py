"""`fedllm.server`: its modules live in the top-level `server/` folder of the source tree.

An installed wheel maps that folder here (`package-dir` in pyproject.toml). From a source
tree or a Flower app bundle (FAB, which never follows symlinks) this package points its
module search path at the folder instead, so `fedllm.server.app` resolves the same everywhere.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent.parent / "server")]

"""Write one benchmark's section into BENCHMARKS.md (between markers), leaving the others."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = """# fedllm benchmarks

Every figure below was produced by a committed script in `experiments/`; each section names
its command. This machine is shared and noisy: compare ratios measured in one run, not
absolute times across sections.
"""


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, " \
           f"Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = time.strftime("%Y-%m-%d")
    block = f"{start}\n{body.strip()}\n\n_Measured {stamp} on {machine()}._\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)

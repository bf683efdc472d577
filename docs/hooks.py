"""MkDocs hooks: pages generated from the single source of each fact.

- ``index.md`` is the repository's README.md (links into docs/ made site-relative);
- ``benchmarks.md`` is BENCHMARKS.md, every figure with its command;
- ``<!-- config-reference -->`` in a page becomes the table of every configuration key, its
  type, default and help text, generated from the schema (fedllm/config_reference.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
CONFIG_MARKER = "<!-- config-reference -->"


def site_relative(markdown: str) -> str:
    """README/BENCHMARKS links and image paths, as seen from the site's root."""
    markdown = markdown.replace("](docs/", "](")
    markdown = re.sub(r"\]\(BENCHMARKS\.md(#[^)]*)?\)", r"](benchmarks.md\1)", markdown)
    return markdown


def on_files(files, config):
    for name, source in (("index.md", "README.md"), ("benchmarks.md", "BENCHMARKS.md")):
        text = site_relative((ROOT / source).read_text(encoding="utf-8"))
        files.append(File.generated(config, name, content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    if CONFIG_MARKER in markdown:
        from fedllm.config_reference import markdown_table, reference

        markdown = markdown.replace(CONFIG_MARKER, markdown_table(reference()))
    return markdown

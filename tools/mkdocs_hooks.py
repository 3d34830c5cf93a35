"""mkdocs hooks: the site's pages that live outside docs/.

The README is the home page, and each experiments/<name>/README.md (with its script and results) and
benchmarks/results/ are part of the site, so the links between them are checked by `mkdocs build --strict` like
any other. Their links are written for the repository (`docs/method.md` from the README, `../experiments/...`
from a docs page, `../../docs/...` from an experiment); in the site docs/ is the root, so those prefixes are
rewritten before the pages are rendered.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("experiments", "benchmarks/results")  # folders of the repository that the site includes as they are


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the README as index.md, and the READMEs and raw files under OUTSIDE at their repository paths."""
    files.append(File.generated(config, "index.md", abs_src_path=str(ROOT / "README.md")))
    for folder in OUTSIDE:
        for path in sorted((ROOT / folder).rglob("*")):
            # a results folder's own markdown (a `wmtp compare` report.md) is a raw file, not a page of the site
            raw_markdown = path.suffix == ".md" and path.name != "README.md"
            if path.is_file() and "__pycache__" not in path.parts and not raw_markdown:
                files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Rewrite repository-relative link prefixes to site-relative ones for pages that come from outside docs/."""
    uri = page.file.src_uri
    if uri == "index.md":
        return re.sub(r"\]\(docs/", "](", markdown)
    if uri.startswith("experiments/"):
        return re.sub(r"\]\(\.\./\.\./docs/", "](../../", markdown)
    return re.sub(r"\]\(\.\./(experiments|benchmarks)/", r"](\1/", markdown)

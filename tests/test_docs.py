"""The README, the docs pages and the model card point only at files that exist in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "src/ccafl_hf/templates/model_card.md", ROOT / "CHANGELOG.md",
         *sorted((ROOT / "docs").glob("*.md"))]
# a relative markdown link: [text](target) where target is not a URL or an in-page anchor
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s#]+)(?:#[^)]*)?\)")
# a file mentioned in code spans: `scripts/train.py`, `benchmarks/ablation.py`, `docs/method.md`, …
MENTION = re.compile(r"`((?:scripts|benchmarks|docs|tests|src)/[\w./-]+\.(?:py|md|json|toml))`")


def _pages():
    return [page for page in PAGES if page.is_file()]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    missing = [target for target in LINK.findall(page.read_text()) if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_mentioned_files_exist(page):
    missing = [name for name in MENTION.findall(page.read_text()) if not (ROOT / name).exists()]
    assert not missing, f"{page.name} mentions missing files: {missing}"


def test_no_page_points_at_the_private_spec():
    """The method page of the repository is docs/method.md; nothing refers to a spec users do not have."""
    sources = [*_pages(), *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "src").rglob("*.json")),
               *sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    offenders = [str(path.relative_to(ROOT)) for path in sources if "METHOD.md" in path.read_text()]
    assert not offenders, f"these files cite METHOD.md, which is not in the repository: {offenders}"


def test_docs_index_lists_every_page():
    readme = (ROOT / "README.md").read_text()
    unlisted = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in readme]
    assert not unlisted, f"README.md does not link these docs pages: {unlisted}"

"""The README is the documentation site's landing page: short, and the same text as ``docs/index.md``; every page of
``mkdocs.yml``'s navigation exists (``mkdocs build --strict`` in ``.ci/run`` checks the links and the API reference)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_short_landing_page_and_the_sites_home():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    # the site's home page is the README with its links made relative to docs/ (regenerate it when this fails:
    # python -c "from pathlib import Path; Path('docs/index.md').write_text(Path('README.md').read_text().replace('](docs/', ']('))")
    assert (ROOT / "docs/index.md").read_text() == readme.replace("](docs/", "](")
    for link in re.findall(r"\]\(docs/([^)#]+)", readme):
        assert (ROOT / "docs" / link).is_file(), link


def test_every_page_of_the_navigation_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = [next(iter(entry.values())) for entry in config["nav"]]
    assert len(pages) == len(set(pages)) >= 15
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), page
    listed = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert listed == set(pages), listed ^ set(pages)  # no page left out of the navigation

"""The README is the documentation site's landing page: short, and the same text as ``docs/index.md``; every page of
``mkdocs.yml``'s navigation exists (``mkdocs build --strict`` in ``.ci/run`` checks the links and the API reference)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
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


def _readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools/readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- numbers: {name} -->", 1)[1].split("<!-- /numbers -->", 1)[0].strip()


def _two_stage_scalars():
    """Logs whose means are easy by hand: nSSM step/100 and VSM step/50 (means over steps a..b: (a+b)/200 and (a+b)/100), gate 0.25."""
    steps = range(120)
    fit = {
        "reward/nssm": [(s, s / 100) for s in steps],
        "reward/vsm": [(s, s / 50) for s in steps],
        "reward/gated_fraction": [(s, 0.25) for s in steps],
        "val/nssm": [(59, 0.7), (119, 0.8)],
        "val/vsm": [(59, 0.6), (119, 0.65)],
    }
    return {"val/nssm": [(0, 0.5)], "val/vsm": [(0, 0.9)]}, fit


def test_readme_numbers_tables_are_worked_by_hand():
    numbers = _readme_numbers()
    base, fit = _two_stage_scalars()
    rows = numbers.two_stage_table(base, fit).splitlines()
    assert (
        rows[2]
        == "| base model (`divrl validate` without a checkpoint) | 0.500 | 0.900 | 0.045 (steps 0–9) | 0.090 | — |"
    )
    assert rows[3] == "| end of stage 1 (step 60, R1 = nSSM) | 0.700 | 0.600 | 0.545 (steps 50–59) | 1.090 | — |"
    assert rows[4] == (
        "| end of stage 2 (step 120, R2 gated at VSM 0.5) | 0.800 | 0.650 | 1.145 (steps 110–119) | 2.290 | 25% |"
    )
    metrics = {
        "methods": {
            m: {"overall": {"vsm": 0.5, "si_iou": None, "mtg_nssm": 0.25}} for m in ("base", "explore", "divrl")
        }
    }
    row = numbers.kontext_evaluation_table(metrics).splitlines()[2]
    assert row == "| base | 0.500 | — | 0.250 | — | — | — |"


def test_readme_numbers_writes_every_table_between_its_markers(tmp_path):
    """Each table ``tools/readme_numbers.py`` makes has one block in its page (the two-stage tables with the header the
    tool writes); writing a table replaces that block and nothing else."""
    numbers = _readme_numbers()
    base, fit = _two_stage_scalars()
    made = {"kontext-training": numbers.two_stage_table(base, fit)}
    for name, page in numbers.TABLES.items():
        text = (ROOT / "docs" / page).read_text()
        block = _block(text, name)
        assert block, name
        assert numbers.replace_block(text, name, block) == text, name  # the markers as the tool writes them
        if name.endswith("-training"):
            assert block.splitlines()[:2] == made["kontext-training"].splitlines()[:2], name

    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    assert numbers.write_tables(
        {"klein-training": made["kontext-training"], "versions": "Last run with x 1."}, docs
    ) == [
        "model-families.md",
        "training.md",
    ]
    families = (docs / "model-families.md").read_text()
    assert _block(families, "klein-training") == made["kontext-training"]
    assert _block(families, "qwen-training") == _block((ROOT / "docs/model-families.md").read_text(), "qwen-training")
    before = (ROOT / "docs/model-families.md").read_text()
    assert families.replace(made["kontext-training"], _block(before, "klein-training")) == before
    assert _block((docs / "training.md").read_text(), "versions") == "Last run with x 1."

    with pytest.raises(ValueError, match="0 '<!-- numbers: absent -->' markers"):
        numbers.replace_block("no markers here", "absent", "x")
    with pytest.raises(ValueError, match="has no '<!-- /numbers -->'"):
        numbers.replace_block("<!-- numbers: open -->\n| a |", "open", "x")
    # a block whose end marker was lost does not swallow the next block
    with pytest.raises(ValueError, match="'<!-- numbers: a -->' has no '<!-- /numbers -->'"):
        numbers.replace_block("<!-- numbers: a -->\nprose\n<!-- numbers: b -->\n| b |\n<!-- /numbers -->", "a", "x")
    numbers.check_markers(list(numbers.TABLES), ROOT / "docs")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare/training.md").write_text("a page without markers\n")
    with pytest.raises(ValueError, match="docs/training.md holds 0"):
        numbers.check_markers(["kontext-training"], tmp_path / "bare")  # caught before any demo runs
    with pytest.raises(KeyError, match="add them to TABLES"):
        numbers.write_tables({"nowhere": "x"}, docs)

"""The tables of docs/results.md and docs/benchmarks.md are what `python -m bench.tables` renders from
the committed JSON in bench/data/ (a hand edit of a figure in a marked region fails here)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed: `pytest` alone finds it too
from bench import tables  # noqa: E402


def stale_names(stale: list[str]) -> list[str]:
    return sorted(line.split(": table ")[1].split()[0] for line in stale)


def outside_regions(text: str) -> str:
    return tables.REGION.sub(lambda m: f"<{m.group(2)}>", text)


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of bench/data and of the two docs, to change without touching the committed ones."""
    data, docs = tmp_path / "data", tmp_path / "docs"
    shutil.copytree(tables.DATA, data)
    docs.mkdir()
    for name in ("results.md", "benchmarks.md", "privacy.md"):
        shutil.copy(tables.DOCS / name, docs / name)
    return data, docs


def edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content, indent=2))


def test_committed_docs_match_the_committed_json():
    stale, errors = tables.update(tables.DOCS, tables.DATA, write=False)
    assert not errors, "\n".join(errors)
    assert not stale, "\n".join(stale) + "\nedit bench/data/, then run `python -m bench.tables`"


def test_every_json_file_says_where_its_figures_come_from():
    files = [tables.DATA / "results.json", *sorted((tables.DATA / "benchmarks").glob("*.json"))]
    assert len(files) >= 9
    for path in files:  # backfilled from the docs (the runs' JSON was not kept), or written by a run's --record
        provenance = json.loads(path.read_text())["provenance"]
        assert "--record" in provenance, path
        assert "not preserved" in provenance or provenance.startswith("measured by `python -m bench."), path


def test_a_changed_figure_makes_its_regions_stale_and_check_writes_nothing(copies, capsys):
    data, docs = copies
    edit_json(data / "results.json", lambda r: r["settings"]["dp8"]["metrics"].update(fid=123.45))
    before = (docs / "results.md").read_text()
    rendered = tables.render(data)
    assert "| 123.45 |" in rendered["results-main"] and rendered != tables.render(tables.DATA)

    assert tables.main(["--check", "--data", str(data), "--docs", str(docs)]) == 1
    assert (docs / "results.md").read_text() == before
    lines = capsys.readouterr().err.splitlines()
    assert stale_names(lines) == ["results-main", "results-targets"]  # one line per stale region

    assert tables.main(["--data", str(data), "--docs", str(docs)]) == 0
    after = (docs / "results.md").read_text()
    assert "| 123.45 |" in after and "295.32" not in after
    assert outside_regions(after) == outside_regions(before)  # the prose is left alone
    assert tables.update(docs, data, write=False) == ([], [])


def test_a_hand_edited_figure_in_a_region_is_stale(copies):
    data, docs = copies
    path = docs / "benchmarks.md"
    text = path.read_text()
    assert text.count("| 356,320 | 0.095 |") == 1
    path.write_text(text.replace("| 356,320 | 0.095 |", "| 356,320 | 0.090 |"))
    stale, errors = tables.update(docs, data, write=False)
    assert not errors and stale_names(stale) == ["bench-training"]


def test_a_missing_region_is_an_error(copies):
    data, docs = copies
    path = docs / "benchmarks.md"
    path.write_text(path.read_text().replace("<!-- /table:bench-federation -->", ""))
    assert tables.main(["--data", str(data), "--docs", str(docs)]) == 1


def test_record_puts_a_new_run_into_the_tables(copies, tmp_path):
    data, docs = copies
    results = json.loads((data / "results.json").read_text())
    metrics = {**results["settings"]["centralised"]["metrics"], "fid": 70.0}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    summary = {"setting": "centralised", "train_seconds": 301.5, "eval_seconds": 55.2,
               "metrics": str(tmp_path / "metrics.json")}
    tables.record_result(summary, "python -m bench.results --setting centralised --record", data)
    benchmark = json.loads((data / "benchmarks" / "training.json").read_text())
    benchmark["demo_vae"]["step_s"] = 0.1234
    tables.record_benchmark("training", benchmark, "python -m bench --only training --record", data)

    entry = json.loads((data / "results.json").read_text())["settings"]["centralised"]
    assert "--record" in entry["provenance"] and entry["summary"] == summary
    rendered = tables.render(data)
    assert "| 70.00 |" in rendered["results-main"] and "| `centralised` | 301.5 | 55.2 |" in rendered["results-time"]
    assert "| 0.1234 |" in rendered["bench-training"]
    stale, _ = tables.update(docs, data, write=False)
    assert stale_names(stale) == ["bench-training", "results-main", "results-targets", "results-time"]


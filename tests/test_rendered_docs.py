"""Every figure of the README and the docs that comes from a result file agrees with the committed JSON.

``benchmarks/render_docs.py`` renders the marked blocks (``<!-- NAME:start -->`` … ``<!-- NAME:end -->``) and
inline figures (``<!--fig KEY-->VALUE<!--/fig-->``) of every page from ``benchmarks/results/`` and
``examples/results/``; here each page is rendered again and compared. A page that disagrees fails with the
names of its stale blocks and figures: run ``python benchmarks/render_docs.py`` (it rewrites them) and commit.
"""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import render_docs

ROOT = render_docs.ROOT
PAGES = render_docs.pages()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_agrees_with_the_committed_results(page):
    assert render_docs.stale(page) == [], "run python benchmarks/render_docs.py and commit the pages"


def test_the_result_figures_are_marked_where_users_read_them():
    """The pages that show results keep their marks (a page whose marks were deleted would pass the check)."""
    blocks = {
        p.relative_to(ROOT).as_posix(): {m["name"] for m in render_docs.BLOCK.finditer(p.read_text())} for p in PAGES
    }
    figures = {p.relative_to(ROOT).as_posix(): len(render_docs.FIGURE.findall(p.read_text())) for p in PAGES}
    assert {"camvid"} <= blocks["README.md"] and figures["README.md"] >= 10
    assert {"choosing", "bench:cpu-train-step"} <= blocks["docs/choosing.md"] and figures["docs/choosing.md"] >= 10
    assert {"camvid-details", "camvid-table", "camvid-diagnosis", "camvid-seeds", "camvid-tiles-table"} <= blocks[
        "docs/camvid.md"
    ]
    assert figures["docs/camvid.md"] >= 30
    assert {"bench:cpu", "bench:cpu-loop", "bench:cpu-2560", "bench:cpu-model"} <= blocks["docs/performance.md"]
    assert figures["docs/performance.md"] >= 10
    assert {"bench:cpu-slide", "camvid-tiles"} <= blocks["docs/large-images.md"] and figures[
        "docs/large-images.md"
    ] >= 2


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_line_starts_with_a_figure_mark(page):
    """A line that starts with ``<!--`` opens an HTML block in Markdown: the rest of the line would show as raw
    text, outside its paragraph. A figure mark follows a word on its line."""
    starts = [n for n, line in enumerate(page.read_text().splitlines(), 1) if line.lstrip().startswith("<!--fig")]
    assert starts == [], f"{page.name}: lines {starts} start with a figure mark"


def test_a_page_that_disagrees_with_its_json_is_found_and_rendered_again(tmp_path):
    page = tmp_path / "page.md"
    key = "camvid/camvid-unseen/cac/unseen/delta"
    block = "<!-- bench:cpu-model:start -->\nan old table\n<!-- bench:cpu-model:end -->"
    page.write_text(f"CAC gains <!--fig {key}-->+9.9<!--/fig--> on the unseen sequence.\n\n{block}\n")
    found = render_docs.stale(page)
    assert len(found) == 2 and found[0] == "block bench:cpu-model" and "+9.9" in found[1], found
    page.write_text(render_docs.render_page(page.read_text()))
    assert render_docs.stale(page) == []
    text = page.read_text()
    assert f"<!--fig {key}-->{render_docs.figure(key)}<!--/fig-->" in text
    assert "| 512 | 4 | 150 | 512 | cac |" in text and "an old table" not in text


def test_figures_are_computed_from_the_json():
    runs = json.loads((ROOT / "examples/results/camvid-unseen.json").read_text())["runs"]
    miou = {(r["classifier"], r["seed"]): r["splits"]["unseen"]["miou"] for r in runs}
    expected = sum(miou["ssa", s] - miou["conv", s] for s in (0, 1, 2)) / 3
    assert render_docs.figure("camvid/camvid-unseen/ssa/unseen/delta") == f"{expected:+.1f}"
    assert render_docs.figure("camvid/camvid-unseen/ssa/unseen/gained") == "3/3"
    assert render_docs.figure("bench/cpu-model/head!=conv/infer_time_ratio~") == "1.00–1.11"
    with pytest.raises(KeyError, match="2 rows"):
        render_docs.figure("bench/cpu-model/head=cac/infer_time_ratio")  # 256 and 512 px: ambiguous
    with pytest.raises(KeyError, match="unknown figure"):
        render_docs.figure("camvid/camvid-unseen/cac")
    with pytest.raises(KeyError, match="no renderer"):
        render_docs.render_block("no-such-block", [])


def test_train_camvid_update_readme_writes_the_blocks_and_names_their_sources(tmp_path, monkeypatch):
    """``train_camvid.py --render NEW.json --update-readme`` (the README's CamVid block) writes the block and
    names the new sources in its start mark, so the check follows a newly rendered result."""
    from examples import train_camvid

    results = tmp_path / "examples" / "results"
    results.mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    for name in ("README.md", "docs/camvid.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    new = json.loads((ROOT / "examples/results/camvid-unseen.json").read_text())
    for run in new["runs"]:
        run["splits"]["unseen"]["miou"] += 1.0 if run["classifier"] == "cac" else 0.0
    (results / "camvid-new.json").write_text(json.dumps(new))
    monkeypatch.setattr(train_camvid, "ROOT", tmp_path)
    train_camvid.main(["--render", str(results / "camvid-new.json"), "--update-readme"])
    readme, details = train_camvid.render_parts(results / "camvid-new.json")
    text = (tmp_path / "README.md").read_text()
    assert f"<!-- camvid:start examples/results/camvid-new.json -->\n{readme}\n<!-- camvid:end -->" in text
    assert "| cac | 33.8 ± 0.6 | +2.5 (3/3) |" in text  # the new figures
    page = (tmp_path / "docs/camvid.md").read_text()
    assert f"<!-- camvid-details:start examples/results/camvid-new.json -->\n{details}\n" in page

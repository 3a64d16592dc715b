"""Tables from hand-made records: CI formatting, bold best, arrows, daggers, reference rows."""

from __future__ import annotations

import csv
import io

import pytest

from harness.cli import main
from harness.results import ResultRecord, format_signature, write_records
from reports.figures import forest_plot
from reports.tables import (
    build_table,
    format_cell,
    load_reference,
    render_csv,
    render_latex,
    render_markdown,
)


def record(model, metric, value, *, low=None, high=None, seed=0, p=None, higher=True, baseline="clip") -> ResultRecord:
    return ResultRecord(
        run_id="r", suite="demo", job_hash=f"{model}{metric}{seed}", config_hash="cfg", model=model,
        model_digest="d", task="retrieval", dataset="cohort", split="test", metric=metric, value=value,
        ci_low=low, ci_high=high, n=100, n_units=90, seed=seed, higher_is_better=higher,
        signature=format_signature("retrieval", metric, 1000, "subject", seed), baseline=baseline, p_value=p,
    )


@pytest.fixture()
def records():
    return [
        record("clip", "i2t/R@1", 0.205, low=0.17, high=0.24),
        record("clip", "i2t/MdR", 6.0, low=5.0, high=7.0, higher=False),
        record("brat_pva", "i2t/R@1", 0.493, low=0.451, high=0.530, p=0.01),
        record("brat_pva", "i2t/MdR", 2.0, low=1.0, high=3.0, higher=False, p=0.2),
        record("random", "i2t/R@1", 0.05, low=0.03, high=0.07, p=0.001),
        record("random", "i2t/MdR", 40.0, low=35.0, high=45.0, higher=False, p=0.001),
    ]


def test_markdown_ci_bold_and_dagger(records):
    text = render_markdown(build_table(records))
    lines = text.splitlines()

    assert lines[0] == "| Model | i2t/R@1 ↑ | i2t/MdR ↓ |"
    assert "| brat_pva | **49.3 [45.1, 53.0]**† | **2.0 [1.0, 3.0]** |" in lines
    assert "| clip | 20.5 [17.0, 24.0] | 6.0 [5.0, 7.0] |" in lines
    assert "| random | 5.0 [3.0, 7.0]† | 40.0 [35.0, 45.0]† |" in lines
    assert "retrieval/*|boot:1000|unit:subject|seed:0" in text
    assert "baseline clip" in text


def test_lower_is_better_best_is_minimum(records):
    table = build_table(records)
    medr = table.columns.index(next(c for c in table.columns if c.metric == "i2t/MdR"))
    best = [row.model for row in table.rows if row.cells[medr].best]
    assert best == ["brat_pva"]


def test_several_seeds_show_mean_and_std():
    records = [
        record("clip", "i2t/R@1", 0.40, seed=0, p=None),
        record("clip", "i2t/R@1", 0.42, seed=1, p=None),
        record("pva", "i2t/R@1", 0.50, seed=0, p=0.01),
        record("pva", "i2t/R@1", 0.52, seed=1, p=0.2),
    ]
    lines = render_markdown(build_table(records)).splitlines()
    assert "| clip | 41.0 ± 1.4 |" in lines
    # The second seed's test is not significant, so no dagger.
    assert "| pva | **51.0 ± 1.4** |" in lines


def test_reference_rows(records):
    reference = load_reference("brat_mskbrain")
    table = build_table(records, metrics=["i2t/R@1"], reference=reference)
    text = render_markdown(table)

    assert "| brat (published) | 20.5 |" in text
    assert "| brat without DPP term (published) | 17.3 |" in text
    assert "| brat with pairwise repulsion (published) | 9.9 |" in text
    assert "| brat with ColBERT matching (published) | 12.5 |" in text
    assert "arXiv 2512.18679" in text
    assert "MSKBrain" in text
    assert "different dataset" in text
    # Published numbers never take the bold of our best value.
    assert "**49.3 [45.1, 53.0]**" in text


def test_reference_file_numbers():
    reference = load_reference("brat_mskbrain")
    assert reference.rows["brat (published)"] == {"i2t/R@1": 20.5, "i2t/R@5": 49.3, "t2i/R@1": 20.1, "t2i/R@5": 48.1}
    assert reference.citation == "brat, arXiv 2512.18679"


def test_unknown_reference_lists_shipped():
    with pytest.raises(FileNotFoundError, match="brat_mskbrain"):
        load_reference("no-such-reference")


def test_latex_booktabs(records):
    text = render_latex(build_table(records, reference=load_reference("brat_mskbrain")))

    assert "\\begin{tabular}{lcc}" in text
    assert "|" not in text.split("\\begin{tabular}")[1].split("}")[0]
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert rule in text
    assert "i2t/R@1 $\\uparrow$" in text
    assert "i2t/MdR $\\downarrow$" in text
    assert "brat\\_pva & \\textbf{49.3 [45.1, 53.0]}$^\\dagger$ & \\textbf{2.0 [1.0, 3.0]} \\\\" in text
    assert text.count("\\midrule") == 2  # header rule and the rule above published rows


def test_csv_values(records):
    rows = list(csv.reader(io.StringIO(render_csv(build_table(records)))))
    header = rows[0]
    assert header[:4] == ["model", "source", "i2t/R@1 (%)", "i2t/R@1 (%) ci_low"]
    pva = next(row for row in rows if row[0] == "brat_pva")
    assert pva[1] == "this run"
    assert pva[header.index("i2t/R@1 (%)")] == "49.30"
    assert pva[header.index("i2t/R@1 (%) p_value")] == "0.0100"
    assert pva[header.index("i2t/MdR")] == "2.00"


def test_unknown_metric_is_named(records):
    with pytest.raises(ValueError, match="t2i/R@99"):
        build_table(records, metrics=["t2i/R@99"])


def test_format_missing_cell():
    assert format_cell(None) == "–"
    assert format_cell(None, latex=True) == "--"


def test_forest_plot_writes_png_and_pdf(tmp_path, records):
    paths = forest_plot(records, tmp_path / "fig" / "forest", "i2t/R@1", load_reference("brat_mskbrain"))
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:4] == b"%PDF"


def test_table_command(tmp_path, records, capsys):
    write_records(tmp_path / "results.jsonl", records)
    assert main(["table", str(tmp_path), "--format", "md", "--metrics", "i2t/R@1", "--reference", "brat_mskbrain"]) == 0
    out = capsys.readouterr().out
    assert "| brat_pva | **49.3 [45.1, 53.0]**† |" in out
    assert "| brat (published) | 20.5 |" in out

    assert main(["table", str(tmp_path), "--format", "latex", "--output", str(tmp_path / "t.tex"), "--figure", str(tmp_path / "f")]) == 0
    assert "\\toprule" in (tmp_path / "t.tex").read_text()
    assert (tmp_path / "f.png").is_file()
    assert (tmp_path / "f.pdf").is_file()


def test_no_bold_when_all_tie():
    records = [record("a", "i2t/R@1", 0.2, low=0.1, high=0.3), record("b", "i2t/R@1", 0.2, low=0.1, high=0.3)]
    assert "**" not in render_markdown(build_table(records))

"""README's benchmark tables come from each script's latest results file, whichever run wrote it: a
run of some scripts refreshes their tables and keeps the others', so README and
benchmarks/results/ never disagree."""

import json

from benchmarks.run_all import README_MARKERS, readme_markers, update_readme


def results_file(folder, name: str, measured_at: str, table: str) -> None:
    data = {"benchmark": name, "measured_at": measured_at, "machine": {"cpu": "Some CPU", "cpu_count": 2,
                                                                       "torch": "2.13.0+cpu"},
            "tables_md": {f"{name} table": table, "not for README": "| x |"}, "readme_tables": [f"{name} table"]}
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_each_script_s_latest_tables_land_in_its_own_block_or_the_general_one(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    results_file(results, "rollout", "2026-12-01T06:58:32+0000", "| rollout | 1.30x |")
    results_file(results, "organism", "2026-12-06T23:12:53+0000", "| organism | 0.49 |")
    start, end = README_MARKERS
    own_start, own_end = readme_markers("organism")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nOrganism prose.\n\n{own_start}\nstale organism\n{own_end}\n\nMore prose.\n\n"
                      f"{start}\nstale tables\n{end}\n\nLayout.\n")

    assert update_readme([{"benchmark": "teacher", "status": "failed (exit 1)", "seconds": 3.0}], readme, results)
    text = readme.read_text()
    assert "stale" not in text
    organism_block = text[text.index(own_start):text.index(own_end)]
    general = text[text.index(start):text.index(end)]
    assert "| organism | 0.49 |" in organism_block and "measured 2026-12-06 23:12 UTC (Some CPU" in organism_block
    assert "| organism | 0.49 |" not in general  # shown once, where README discusses it
    assert "| rollout | 1.30x |" in general and "measured 2026-12-01 06:58 UTC" in general
    assert "`benchmarks.teacher`: failed (exit 1)" in general
    assert "not for README" not in text
    assert text.startswith("# Title\n\nOrganism prose.\n\n") and text.endswith(f"{end}\n\nLayout.\n")


def test_a_script_s_results_from_a_run_by_hand_follow_its_own(tmp_path):
    """benchmarks.consolidation on workloads outside `make bench` (paper-large: minutes a step) saves
    consolidation-<workloads>.json beside consolidation.json; README shows both, each headed by the
    command that measured it."""
    from benchmarks.consolidation import results_name

    results = tmp_path / "results"
    results.mkdir()
    assert results_name(["tiny", "paper-small"]) == "consolidation"
    assert results_name(["paper-large"]) == "consolidation-paper-large"
    results_file(results, "consolidation", "2026-12-07T07:08:00+0000", "| tiny | 2.2x |")
    results_file(results, "consolidation-paper-large", "2026-12-07T09:30:00+0000", "| paper-large | 3x |")
    by_hand = json.loads((results / "consolidation-paper-large.json").read_text())
    by_hand["command"] = "python -m benchmarks.consolidation --workloads paper-large"
    (results / "consolidation-paper-large.json").write_text(json.dumps(by_hand))
    start, end = README_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"{start}\n{end}\n")

    assert update_readme([], readme, results)
    text = readme.read_text()
    assert text.index("| tiny | 2.2x |") < text.index("| paper-large | 3x |")
    assert "`python -m benchmarks.consolidation`, measured 2026-12-07 07:08 UTC" in text
    assert "`python -m benchmarks.consolidation --workloads paper-large`, measured 2026-12-07 09:30 UTC" in text


def test_a_readme_without_the_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    assert not update_readme([], readme, tmp_path)
    assert readme.read_text() == "# Title\n"


def test_run_all_keeps_each_script_s_latest_runtime(tmp_path):
    from benchmarks.run_all import runtimes_record

    path = tmp_path / "run_all.json"
    first = [{"benchmark": "a", "seconds": 10.0, "status": "ok"}, {"benchmark": "b", "seconds": 20.0, "status": "ok"}]
    path.write_text(json.dumps(runtimes_record(first, 30.0, path)))
    again = runtimes_record([{"benchmark": "b", "seconds": 25.0, "status": "timeout"}], 25.0, path)
    assert [r["benchmark"] for r in again["runs"]] == ["b"] and again["seconds"] == 25.0
    assert {k: v["seconds"] for k, v in again["latest"].items()} == {"a": 10.0, "b": 25.0}
    assert again["latest"]["b"]["status"] == "timeout" and again["latest_total_seconds"] == 35.0

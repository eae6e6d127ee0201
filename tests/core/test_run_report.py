"""`dino-ray report`: the results and timings a run wrote, read back from its manifests."""

from __future__ import annotations

import json

import pytest

from dino_ray.cli import main
from dino_ray.run_report import load_report, render, update_readme


def _stage(root, name, seconds, summary, outputs=None):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "_manifest.json").write_text(json.dumps({"stage": name, "seconds": seconds, "summary": summary,
                                                  "outputs": outputs or {}}))
    return d


@pytest.fixture
def run_root(tmp_path):
    root = tmp_path / "out"
    _stage(root, "pretrain", 125.4, {"images": 1000, "steps": 300})
    _stage(root, "curate", 61.0, {"pool_files": 1434, "duplicates_removed": 73, "decontaminated": 23, "kept": 1135})
    results = root / "eval" / "results.json"
    (root / "eval").mkdir()
    results.write_text(json.dumps([
        {"dataset": "digits", "backbone": "pretrain", "knn_k20_top1": 0.4125, "linear_test_top1": 0.385,
         "retrieval_mAP": 0.2261},
        {"dataset": "digits", "backbone": "pixels", "knn_k20_top1": 0.99},
        {"dataset": "digits", "backbone": "random", "knn_k20_top1": 0.078, "knn_avgpool_k20_top1": 0.485}]))
    _stage(root, "eval", 30.0, {"images_extracted_this_run": 10}, {"results": str(results)})
    # an unfinished stage (no manifest) is not reported
    (root / "distill").mkdir()
    return root


def test_report_reads_manifests_in_stage_order(run_root):
    report = load_report(str(run_root))
    assert list(report.stages) == ["curate", "pretrain", "eval"]
    assert report.total_seconds == pytest.approx(216.4)
    text = render(report)
    assert "| pretrain | 41.2 % | - | 38.5 % | 22.6 % |" in text
    assert "| pixels | 99.0 % | - | - | - |" in text
    assert "| curate | 1 min 1 s | 1434 | 73 | 23 | 1135 | - | - |" in text
    assert "| **total** | 3 min 36 s |" in text
    assert ("digits: the best trained backbone (pretrain) loses to raw pixels by 57.8 points (41.2 % vs 99.0 %) "
            "and loses to a randomly initialised ViT (the better of its CLS and pooled patches) by 7.3 points "
            "(41.2 % vs 48.5 %) in knn_k20_top1. Why: raw pixels win when") in text


def test_the_verdict_says_why_raw_pixels_win_from_the_linear_probe(run_root):
    results = run_root / "eval" / "results.json"
    rows = json.loads(results.read_text())
    rows[1]["linear_test_top1"] = 0.36  # below the backbone's 38.5 %: the features know more than kNN shows
    results.write_text(json.dumps(rows))
    text = render(load_report(str(run_root)))
    assert "Why: its linear probe beats raw pixels' (38.5 % vs 36.0 %)" in text
    rows[0]["knn_k20_top1"] = 0.995  # the backbone wins: no explanation owed
    results.write_text(json.dumps(rows))
    assert "Why:" not in render(load_report(str(run_root)))


def test_cli_report_updates_readme_between_markers(run_root, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:demo -->\nold figures\n<!-- /report:demo -->\noutro\n")
    assert main(["report", str(run_root), "--update-readme", "demo", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old figures" not in text and "| pretrain | 41.2 %" in text
    assert text.startswith("intro\n<!-- report:demo -->\n") and text.endswith("<!-- /report:demo -->\noutro\n")
    assert "41.2 %" in capsys.readouterr().out


def test_report_errors_name_the_path(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope: no such output root" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no completed stage" in capsys.readouterr().err
    readme = tmp_path / "R.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="report:x"):
        update_readme(readme, "x", "t")


def test_compare_two_runs_names_the_largest_difference(run_root, tmp_path):
    import shutil

    other = tmp_path / "again"
    shutil.copytree(run_root, other)
    results = json.loads((other / "eval" / "results.json").read_text())
    results[0]["linear_test_top1"] = 0.41
    (other / "eval" / "results.json").write_text(json.dumps(results))
    manifest = json.loads((other / "eval" / "_manifest.json").read_text())
    manifest["outputs"]["results"] = str(other / "eval" / "results.json")  # each run's own output
    (other / "eval" / "_manifest.json").write_text(json.dumps(manifest))
    text = render(load_report(str(run_root)), load_report(str(other)))
    assert "- curation counts (duplicates_removed, decontaminated, kept): identical" in text
    assert "- kNN metrics: identical" in text
    assert "- linear probe metrics: largest difference 2.50 points (pretrain linear_test_top1: 38.5 % vs 41.0 %)" in text

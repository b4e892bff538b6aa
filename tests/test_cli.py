"""The command line as a user runs it: `python -m galaxy_tune ...`, demo defaults, one-line errors."""

import json
import subprocess
import sys

import pandas as pd

from galaxy_tune.cli import main
from galaxy_tune.kaggle import CSV_NAME


def galaxy_tune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "galaxy_tune", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_demo_data_and_prepare_from_the_shell(tmp_path):
    done = galaxy_tune("demo-data", tmp_path / "demo", "--num-images", 40, "--seed", 3)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(tmp_path / "demo" / CSV_NAME)) == 40
    done = galaxy_tune("prepare", "--data-dir", tmp_path / "demo", "--out", tmp_path / "prep", "--image-size", 16)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.split()[:1] == ["train"] for line in lines) and "Class6.2" in done.stdout
    assert (tmp_path / "prep" / "splits.csv").is_file() and (tmp_path / "prep" / "prepare.json").is_file()


def test_bad_input_is_one_line_naming_the_fix_and_debug_shows_the_traceback(tmp_path):
    done = galaxy_tune("prepare", "--data-dir", tmp_path / "missing")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr and "--data-dir" in done.stderr
    assert "Traceback" not in done.stderr
    debug = galaxy_tune("--debug", "prepare", "--data-dir", tmp_path / "missing")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_results_folder_that_cannot_be_written_is_refused(demo_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["prepare", "--data-dir", str(demo_dir), "--out", str(blocker / "out")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_without_data_dir_the_demo_data_is_generated_and_used(ray_local, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["search", "lora", "--results-dir", str(results), "--model", "tiny", "--num-samples", "2",
            "--max-epochs", "1", "--name", "demo", "--no-augment"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "using the built-in demo data" in out
    assert (results / "demo-data" / CSV_NAME).is_file()
    assert len(pd.read_csv(results / "demo" / "trials.csv")) == 2
    assert json.loads((results / "demo" / "best.json").read_text())["config"]["augment"] is False
    # With no search of a method, retrain says so and uses the reference recipe.
    assert main(["retrain", "--results-dir", str(results), "--methods", "full", "--model", "tiny",
                 "--max-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "full: no search found, retraining the reference recipe" in out
    assert "reference test acc" in out


def test_resume_with_the_wrong_method_is_refused(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "search.json").write_text(json.dumps(
        {"method": "lora", "data_dir": str(tmp_path), "results_dir": str(tmp_path), "name": "s"}))
    assert main(["search", "full", "--resume", "--name", "s", "--results-dir", str(tmp_path)]) == 2
    assert "is a lora search: resume it with `search lora --resume --name s`" in capsys.readouterr().err


def test_retrain_refuses_searches_made_on_different_data(tmp_path, capsys):
    for method, size in (("full", 64), ("lora", 128)):
        (tmp_path / method).mkdir()
        (tmp_path / method / "best.json").write_text(json.dumps({
            "method": method, "model": "tiny", "data": {"prepared": str(tmp_path / "p"), "image_size_px": size,
                                                        "crop_px": None}}))
    assert main(["retrain", "--results-dir", str(tmp_path)]) == 2
    assert "used different data, image sizes or models" in capsys.readouterr().err


def test_retrain_from_a_search_whose_prepared_data_is_gone(tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "best.json").write_text(json.dumps({
        "method": "lora", "model": "tiny", "data": {"prepared": str(tmp_path / "gone"), "image_size_px": 32,
                                                    "crop_px": None}}))
    assert main(["retrain", "--results-dir", str(tmp_path), "--methods", "lora"]) == 2
    assert "is gone: run `python -m galaxy_tune prepare`" in capsys.readouterr().err

"""The command line as a user runs it: `python -m galaxy_tune ...`, demo defaults, one-line errors."""

import json
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from galaxy_tune.cli import main
from galaxy_tune.data.kaggle import CSV_NAME
from galaxy_tune.search.cluster import dashboard_hint


def galaxy_tune(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "galaxy_tune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


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


@pytest.mark.parametrize("early_stopping, scheduler", [(True, "asha"), (False, "fifo")])
def test_a_search_json_from_before_the_scheduler_option_resumes_with_its_scheduler(tmp_path, early_stopping,
                                                                                   scheduler):
    from galaxy_tune.search.run import saved_options

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "search.json").write_text(json.dumps(
        {"method": "full", "data": {"data_dir": str(tmp_path), "seed": 0}, "results_dir": str(tmp_path),
         "name": "old", "sampler": "tpe", "early_stopping": early_stopping}))
    options = saved_options(tmp_path / "old")
    assert (options.scheduler, options.sampler, options.resume) == (scheduler, "tpe", True)


@pytest.mark.parametrize("flag, value, choices", [("--scheduler", "pbt", "asha, hyperband, fifo"),
                                                  ("--sampler", "cmaes", "tpe, tpe-independent, random")])
def test_an_unknown_sampler_or_scheduler_is_one_line_naming_the_choices(demo_dir, tmp_path, capsys, flag, value,
                                                                       choices):
    assert main(["search", "lora", flag, value, "--data-dir", str(demo_dir), "--results-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{flag} {value!r} is unknown: choose one of {choices}" in error
    assert list(tmp_path.iterdir()) == []  # refused before anything was prepared or started


def test_retrain_refuses_searches_made_on_different_data(tmp_path, capsys):
    for method, size in (("full", 64), ("lora", 128)):
        (tmp_path / method).mkdir()
        (tmp_path / method / "best.json").write_text(json.dumps({
            "method": method, "model": "tiny", "data": {"prepared": str(tmp_path / "p"), "image_size_px": size,
                                                        "crop_px": None}}))
    assert main(["retrain", "--results-dir", str(tmp_path)]) == 2
    assert "used different data, image sizes or models" in capsys.readouterr().err


@pytest.mark.parametrize("flags, culprit", [
    (["--task", "kaggle-votes"], "--task kaggle-votes differs from the searches' seed-top2"),
    (["--image-size", "128"], "--image-size 128 differs from the searches' 64"),
    (["--data-dir", "elsewhere"], "--data-dir"),
    (["--task", "seed-top2", "--image-size", "64"], None),  # the searches' own settings: accepted
    (["--min-vote", "0.9"], None),  # meaningless to seed-top2 (its split records none), as for `prepare`
])
def test_retrain_refuses_data_settings_other_than_its_searches(tmp_path, capsys, flags, culprit):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "best.json").write_text(json.dumps({
        "method": "lora", "model": "tiny", "data": {"prepared": str(tmp_path / "gone"), "image_size_px": 64,
                                                    "crop_px": None, "task": "seed-top2", "seed": 0,
                                                    "data_dir": str(tmp_path / "kaggle")}}))
    assert main(["retrain", "--results-dir", str(tmp_path), "--methods", "lora", *flags]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    if culprit:
        assert culprit in error and "retrain tests on its searches' data" in error
    else:  # past the check, to the next one: the searches' prepared data is gone
        assert "is gone" in error


def test_retrain_from_a_search_whose_prepared_data_is_gone(tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "best.json").write_text(json.dumps({
        "method": "lora", "model": "tiny", "data": {"prepared": str(tmp_path / "gone"), "image_size_px": 32,
                                                    "crop_px": None}}))
    assert main(["retrain", "--results-dir", str(tmp_path), "--methods", "lora"]) == 2
    assert "is gone: run `python -m galaxy_tune prepare`" in capsys.readouterr().err


@pytest.mark.parametrize("argv, culprit", [
    (["prepare", "--image-size", "0"], "--image-size 0 must be between 8 and 4096 px"),
    (["prepare", "--crop", "0"], "--crop 0 must be between 8 and 424 px"),
    (["prepare", "--seed", "-1"], "--seed -1 must be 0 or more"),
    (["prepare", "--min-vote", "1.5"], "--min-vote 1.5 must be a vote fraction between 0 and 1"),
    (["search", "lora", "--num-samples", "0"], "--num-samples 0 must be 1 or more"),
    (["search", "lora", "--max-epochs", "0"], "--max-epochs 0 must be 1 or more"),
    (["search", "lora", "--max-concurrent", "0"], "--max-concurrent 0 must be 1 or more"),
    (["search", "lora", "--checkpoint-every", "-1"], "--checkpoint-every -1 must be 0 or more"),
    (["search", "lora", "--max-failures", "-1"], "--max-failures -1 must be 0 or more"),
    (["search", "lora", "--cpus-per-trial", "0"], "--cpus-per-trial 0 must be more than 0"),
    (["search", "lora", "--gpus-per-trial", "2"], "--gpus-per-trial 2: a trial trains on at most one GPU"),
    (["search", "lora", "--device", "cpu", "--gpus-per-trial", "0.5"], "--device cpu with --gpus-per-trial 0.5"),
    (["retrain", "--seeds", "0"], "--seeds 0 must be 1 or more"),
    (["retrain", "--max-epochs", "0"], "--max-epochs 0 must be 1 or more"),
    (["predict", "--model", "m", "--images", "i", "--image-size", "0"], "--image-size 0 must be 8 or more"),
])
def test_numbers_an_option_cannot_honour_are_refused_before_anything_starts(demo_dir, tmp_path, capsys, argv,
                                                                            culprit):
    data = [] if argv[0] == "predict" else ["--data-dir", str(demo_dir), "--results-dir", str(tmp_path)]
    assert main([*argv, *data]) == 2
    assert culprit in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing prepared, no experiment started: 0 never means "default"


def test_an_address_where_no_ray_listens_fails_fast_with_how_to_check_it(demo_dir, tmp_path):
    with socket.socket() as probe:  # a free port on this machine: nothing listens there once it is closed
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    done = galaxy_tune("search", "lora", "--address", address, "--data-dir", demo_dir, "--results-dir", tmp_path,
                       timeout=30)
    assert done.returncode == 2 and time.monotonic() - started < 30
    assert f"no Ray cluster answers at {address}" in done.stderr and f"ray status --address {address}" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_the_dashboard_hint_names_the_port_ray_actually_used():
    assert "ssh -L 8266:127.0.0.1:8266" in dashboard_hint("127.0.0.1:8266")


HEAVY = ("torch", "ray", "optuna", "transformers")
IMPORTS_OF = """
import sys
from galaxy_tune.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("imported:", *sorted(m for m in {heavy} if m in sys.modules))
""".format(heavy=HEAVY)


@pytest.mark.parametrize("argv, needs", [
    (["--help"], set()),
    (["demo-data", "{tmp}/demo", "--num-images", "20"], set()),
    (["prepare", "--data-dir", "{tmp}/none"], set()),
    (["report", "{tmp}/none"], set()),
    (["predict", "--model", "{tmp}/none", "--images", "{tmp}"], {"torch", "transformers"}),
    (["retrain", "--from", "{tmp}/none"], {"torch", "transformers"}),
    (["search", "lora", "--num-samples", "0"], {"torch", "transformers", "ray", "optuna"}),
])
def test_each_command_imports_only_the_libraries_it_uses(tmp_path, argv, needs):
    # A command run to its first error has imported what it needs: --help and demo-data nothing heavy,
    # predict and report no Ray, retrain no Optuna unless it reads a study, search all of it.
    done = subprocess.run([sys.executable, "-c", IMPORTS_OF, *(a.format(tmp=tmp_path) for a in argv)],
                          capture_output=True, text=True, timeout=120)
    imported = done.stdout.splitlines()[-1].split()
    assert imported[0] == "imported:" and set(imported[1:]) == needs, done.stderr[-2000:]


def test_the_python_api_functions_stay_functions_when_their_modules_are_imported():
    done = subprocess.run([sys.executable, "-c", """
import galaxy_tune
assert callable(galaxy_tune.search)  # the API, imported on first use
import galaxy_tune.search.run, galaxy_tune.retrain, galaxy_tune.predict, galaxy_tune.api
assert all(getattr(galaxy_tune, n) is getattr(galaxy_tune.api, n) for n in galaxy_tune.__all__)
"""], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_retrain_takes_no_config_from_a_search_still_running_or_interrupted(tmp_path, capsys):
    for name, state in (("running", {"running": True}), ("stopped", {"running": False, "complete": False})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "search.json").write_text("{}")
        (tmp_path / name / "best.json").write_text(json.dumps({"method": "lora", **state}))
        assert main(["retrain", "--results-dir", str(tmp_path), "--from", str(tmp_path / name)]) == 2
        assert "still running, interrupted" in capsys.readouterr().err
    from galaxy_tune.retrain import latest_searches

    assert latest_searches(tmp_path) == {}  # live best.json files are not finished searches

"""The command line as a user runs it: `python -m galaxy_tune ...`, demo defaults, one-line errors."""

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from galaxy_tune.cli import main
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.data.kaggle import CSV_NAME, IMAGES_DIR
from galaxy_tune.data.prepare import read_votes, task_labels
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


def opened_for_writing(fifo, timeout: float) -> int:
    """A write end of the named pipe `fifo`, opened once a reader holds the other end."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def reading_a_pipe(pid: int, timeout: float) -> None:
    """Until a thread of process `pid` sleeps in a pipe's read (Linux names the kernel function it sleeps in: its
    wchan). A signal that lands before the read starts, just after the pipe opened, interrupts nothing: the read
    then waits for good. Where the kernel hides wchan, this waits `timeout` s, and the read has begun by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if any(wchan.read_text().endswith(("pipe_read", "pipe_wait"))
                   for wchan in Path(f"/proc/{pid}/task").glob("*/wchan")):
                return
        time.sleep(0.05)


# `python -m galaxy_tune` with Ctrl-C live, as a shell starts it. After earlier tests this test's process was seen
# ignoring SIGINT and SIGQUIT (as the C library's `system()` leaves its caller while a command runs), and a Python
# started from a process that ignores SIGINT ignores Ctrl-C for good.
AS_FROM_A_SHELL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "sys.argv[0] = 'galaxy_tune'; runpy.run_module('galaxy_tune', run_name='__main__', alter_sys=True)")


def test_ctrl_c_during_prepare_says_what_prepare_left_and_leaves_no_folder(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    # The first galaxy to decode is a named pipe: prepare waits there, mid-decoding, until it is interrupted.
    stalled = data / IMAGES_DIR / f"{task_labels(read_votes(data), 'seed-top2').index[0]}.jpg"
    stalled.unlink()
    os.mkfifo(stalled)
    results = tmp_path / "results"
    driver = subprocess.Popen([sys.executable, "-c", AS_FROM_A_SHELL, "prepare", "--data-dir", str(data),
                               "--results-dir", str(results), "--image-size", "16"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        writer = opened_for_writing(stalled, timeout=120)
        reading_a_pipe(driver.pid, timeout=10)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
        if writer is not None:
            os.close(writer)
    assert driver.returncode == 130, err
    assert err.splitlines()[-1] == "interrupted: prepare stopped; nothing half-written is kept: run it again"
    assert not results.exists()  # the prepared folder it had begun is gone, and the results folder with it


def test_a_results_folder_that_cannot_be_written_is_refused(demo_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["prepare", "--data-dir", str(demo_dir), "--out", str(blocker / "out")]) == 2
    assert "cannot write" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_race(ray_local, tmp_path_factory):
    """A search without --data-dir, started as a user starts it, and a second one of its name started in the
    meantime. The first search makes its experiment folder before anything else, then waits to read its space
    file, a named pipe; the second is started then. The first then gets a space of one parameter.

    Returns the results folder, what the first search printed (stdout, stderr), and what the second one said."""
    results = tmp_path_factory.mktemp("demo-race") / "results"
    space, experiment = results.parent / "lr.yaml", results / "demo"
    os.mkfifo(space)
    argv = ["search", "lora", "--results-dir", str(results), "--model", "tiny", "--num-samples", "1", "--max-epochs",
            "1", "--space", str(space), "--name", "demo", "--no-augment", "--address",
            ray_local.get_runtime_context().gcs_address]
    first = subprocess.Popen([sys.executable, "-m", "galaxy_tune", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not experiment.is_dir():
            assert first.poll() is None and time.monotonic() < deadline, "the first search made no folder"
            time.sleep(0.2)
        second = io.StringIO()
        with contextlib.redirect_stderr(second):
            assert main(argv) == 2
        assert experiment.is_dir()  # the first search's, untouched
        space.write_text("params: {lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}, epochs: 1}\n")
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    return results, out, second.getvalue()


def test_a_search_started_while_another_of_its_name_starts_is_refused_at_once(demo_race):
    results, out, refused = demo_race
    experiment = results / "demo"
    assert refused.count("\n") == 1 and f"experiment {experiment} already exists" in refused and "--name" in refused
    best = json.loads((experiment / "best.json").read_text())
    assert best["running"] is False and best["complete"] is True and (experiment / "report.md").is_file()
    # One searched parameter: the console table shows it, and only it.
    header = [line for line in out.splitlines() if line.startswith("| Trial name")][-1]  # the final table's
    assert [column.strip() for column in header.strip("|").split("|")][2:] == ["loc", "lr", "epoch", "val accuracy"]
    assert "Current best trial: " in out and "parameters={'lr': " in out  # the line that needs every column


def test_without_data_dir_the_demo_data_is_generated_and_used(demo_race, capsys):
    results, out, _ = demo_race
    assert "using the built-in demo data" in out
    assert (results / "demo-data" / CSV_NAME).is_file()
    assert len(pd.read_csv(results / "demo" / "trials.csv")) == 1
    best = json.loads((results / "demo" / "best.json").read_text())
    assert best["config"]["augment"] is False and best["complete"] is True
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


def test_an_experiment_saved_before_the_modules_moved_is_refused_in_one_line(tmp_path):
    from galaxy_tune.search.run import restore
    from galaxy_tune.search.trainable import train_trial

    # What galaxy_tune 0.1's tuner.pkl starts with: a pickled reference to its flat module galaxy_tune.space.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tuner.pkl").write_bytes(b"cgalaxy_tune.space\nSearchSpace\n.")
    with pytest.raises(GalaxyTuneError, match=r"saved by galaxy_tune 0.1 .*galaxy_tune.space.*galaxy_tune 0.1.0"):
        restore(tmp_path / "old", train_trial)


@pytest.mark.parametrize("early_stopping, scheduler", [(True, "asha"), (False, "fifo")])
def test_a_search_json_from_before_the_scheduler_option_resumes_with_its_scheduler(tmp_path, early_stopping,
                                                                                   scheduler):
    from galaxy_tune.search.options import saved_options

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "search.json").write_text(json.dumps(
        {"method": "full", "data": {"data_dir": str(tmp_path), "seed": 0}, "results_dir": str(tmp_path),
         "name": "old", "sampler": "tpe", "early_stopping": early_stopping}))
    options = saved_options(tmp_path / "old")
    assert (options.scheduler, options.sampler, options.resume) == (scheduler, "tpe", True)


@pytest.mark.parametrize("flag, value, choices", [("--scheduler", "pbt", ("asha", "hyperband", "fifo")),
                                                  ("--sampler", "cmaes", ("tpe", "tpe-independent", "random"))])
def test_an_unknown_sampler_or_scheduler_is_refused_naming_the_flag_and_its_choices(tmp_path, capsys, flag, value,
                                                                                  choices):
    with pytest.raises(SystemExit) as refused:  # by the parser, which shows the choices in the usage line too
        main(["search", "lora", flag, value, "--results-dir", str(tmp_path)])
    assert refused.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: invalid choice: {value!r}" in error and all(repr(c) in error for c in choices)
    assert list(tmp_path.iterdir()) == []  # refused before anything was prepared or started


def test_the_python_api_refuses_an_unknown_sampler_in_one_line_naming_the_choices(demo_dir, tmp_path):
    from galaxy_tune import api
    from galaxy_tune.errors import GalaxyTuneError

    with pytest.raises(GalaxyTuneError, match="--sampler 'cmaes' is unknown: choose one of tpe, tpe-independent, "
                       "random"):
        api.search("lora", demo_dir, results_dir=tmp_path, sampler="cmaes")
    assert list(tmp_path.iterdir()) == []


def test_the_parser_offers_the_samplers_schedulers_and_devices_the_search_knows():
    from galaxy_tune import cli
    from galaxy_tune.search.strategy import SAMPLERS, SCHEDULERS
    from galaxy_tune.train import DEVICES

    assert (cli.SAMPLER_NAMES, cli.SCHEDULER_NAMES, cli.DEVICE_NAMES) == (tuple(SAMPLERS), tuple(SCHEDULERS), DEVICES)


def test_every_option_says_what_it_does_and_its_default():
    from galaxy_tune.cli import build_parser, subparsers

    missing = []
    for words, parser in subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            name = f"{' '.join(words)} {action.option_strings[-1] if action.option_strings else action.dest}"
            flag = action.nargs == 0  # --resume, --tta, ...: off unless given
            if not action.help or not (flag or action.required or "default" in action.help):
                missing.append(name)
    assert not missing, missing


@pytest.mark.parametrize("argv", [["--debug", "prepare"], ["prepare", "--debug"], ["search", "lora", "--debug"],
                                  ["bench", "gpu", "--debug"]])
def test_debug_is_accepted_before_or_after_the_command(argv):
    from galaxy_tune.cli import build_parser

    assert build_parser().parse_args(argv).debug is True
    assert build_parser().parse_args([a for a in argv if a != "--debug"]).debug is False


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    from galaxy_tune.errors import GalaxyTuneError

    with pytest.raises(GalaxyTuneError, match="does not exist"):
        main(["prepare", "--data-dir", str(tmp_path / "missing"), "--debug"])


def test_the_top_level_help_gives_the_purpose_and_the_workflow(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "ResNet-50 on Galaxy Zoo" in help_text and "demo-\n" not in help_text
    steps = [help_text.index(f"python -m galaxy_tune {step}") for step in ("demo-data", "prepare", "search",
                                                                           "retrain", "predict", "report")]
    assert steps == sorted(steps)


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
    (["--min-vote", "0.9"], "--min-vote 0.9 is ignored by --task seed-top2"),  # as by `prepare` and `search`
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
        assert culprit in error and ("retrain tests on its searches' data" in error or "--min-vote" in culprit)
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
    (["prepare", "--min-vote", "0.9"], "--min-vote 0.9 is ignored by --task seed-top2: only smooth-featured"),
    (["search", "lora", "--task", "kaggle-votes", "--min-vote", "0.9"], "--min-vote 0.9 is ignored by --task "
     "kaggle-votes"),
])
def test_numbers_an_option_cannot_honour_are_refused_before_anything_starts(demo_dir, tmp_path, capsys, argv,
                                                                            culprit):
    data = [] if argv[0] == "predict" else ["--data-dir", str(demo_dir), "--results-dir", str(tmp_path)]
    assert main([*argv, *data]) == 2
    assert culprit in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing prepared, no experiment started: 0 never means "default"


@pytest.mark.parametrize("name", ["{tmp}/elsewhere", "../escape", "a/b", "..", ".hidden", "two words"])
def test_a_name_that_is_not_one_folder_name_is_refused_at_once(demo_dir, tmp_path, capsys, name):
    name = name.format(tmp=tmp_path)
    argv = ["search", "full", "--name", name, "--data-dir", str(demo_dir), "--results-dir", str(tmp_path / "results"),
            "--model", "tiny", "--image-size", "32", "--num-samples", "1", "--max-epochs", "1"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"--name {name!r} is not allowed: a name is one folder name inside --results-dir" in error
    assert error.count("\n") == 1 and list(tmp_path.iterdir()) == []  # nothing written, anywhere


def test_an_address_where_no_ray_listens_fails_fast_with_how_to_check_it(demo_dir, tmp_path, capsys):
    with socket.socket() as probe:  # a free port on this machine: nothing listens there once it is closed
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    assert main(["search", "lora", "--address", address, "--data-dir", str(demo_dir), "--results-dir",
                 str(tmp_path)]) == 2
    assert time.monotonic() - started < 30  # not Ray's minutes of retries
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at {address}" in err and f"ray status --address {address}" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_the_dashboard_hint_names_the_port_ray_actually_used():
    assert "ssh -L 8266:127.0.0.1:8266" in dashboard_hint("127.0.0.1:8266")


HEAVY = ("torch", "ray", "optuna", "transformers", "mlflow")  # mlflow: only with --mlflow
# Each command runs to its first error, all in one interpreter, in this order: the heavy libraries loaded after a
# command are those of the commands before it and its own. --help, demo-data, prepare, report and a search refused
# for its --name import nothing heavy; predict and retrain torch and transformers, but no Ray and no Optuna; search
# all of it.
COMMAND_IMPORTS = [
    (["--help"], set()),
    (["demo-data", "{tmp}/demo", "--num-images", "20"], set()),
    (["prepare", "--data-dir", "{tmp}/none"], set()),
    (["report", "{tmp}/none"], set()),
    (["search", "lora", "--name", "../elsewhere"], set()),  # a name is refused before anything is imported
    (["predict", "--model", "{tmp}/none", "--images", "{tmp}"], {"torch", "transformers"}),
    (["retrain", "--from", "{tmp}/none"], {"torch", "transformers"}),
    (["search", "lora", "--num-samples", "0"], {"torch", "transformers", "ray", "optuna"}),
]
IMPORTS_OF = """
import json, sys
from galaxy_tune.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit:
        pass
    print("imported:", *sorted(m for m in {heavy} if m in sys.modules), flush=True)
""".format(heavy=HEAVY)


API_STAYS = """
import galaxy_tune
assert callable(galaxy_tune.search)  # the API, imported on first use
import galaxy_tune.search.run, galaxy_tune.retrain, galaxy_tune.predict, galaxy_tune.api
assert all(getattr(galaxy_tune, n) is getattr(galaxy_tune.api, n) for n in galaxy_tune.__all__)
"""


@pytest.fixture(scope="module")
def fresh_imports(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, list]]:
    """The two import checks, each in a fresh Python, started at once: name -> (process, argv of each command)."""
    tmp = tmp_path_factory.mktemp("imports")
    commands = [[a.format(tmp=tmp) for a in argv] for argv, _ in COMMAND_IMPORTS]
    checks = {"commands": ([sys.executable, "-c", IMPORTS_OF, json.dumps(commands)], commands),
              "api": ([sys.executable, "-c", API_STAYS], [])}
    started = {name: (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), extra)
               for name, (argv, extra) in checks.items()}
    yield started
    for process, _ in started.values():
        process.kill()
        process.wait()


def test_each_command_imports_only_the_libraries_it_uses(fresh_imports):
    process, commands = fresh_imports["commands"]
    out, err = process.communicate(timeout=120)
    imported = [line.split()[1:] for line in out.splitlines() if line.startswith("imported:")]
    assert len(imported) == len(COMMAND_IMPORTS), err[-2000:]
    for argv, (_, needs), after in zip(commands, COMMAND_IMPORTS, imported):
        assert set(after) == needs, f"after {argv}"


def test_the_python_api_functions_stay_functions_when_their_modules_are_imported(fresh_imports):
    process, _ = fresh_imports["api"]
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]


def test_retrain_takes_no_config_from_a_search_still_running_or_interrupted(tmp_path, capsys):
    for name, state in (("running", {"running": True}), ("stopped", {"running": False, "complete": False})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "search.json").write_text("{}")
        (tmp_path / name / "best.json").write_text(json.dumps({"method": "lora", **state}))
        assert main(["retrain", "--results-dir", str(tmp_path), "--from", str(tmp_path / name)]) == 2
        assert "still running, interrupted" in capsys.readouterr().err
    from galaxy_tune.retrain import latest_searches

    assert latest_searches(tmp_path) == {}  # live best.json files are not finished searches

"""Watching a running search: optuna.db, trials.csv and best.json while trials finish, and after --resume."""

import json
import pickle
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from galaxy_tune.search import monitor
from galaxy_tune.search.space import default_space_path, load_space
from galaxy_tune.data.tasks import get_task

TASK = get_task("seed-top2")
LORA = load_space(default_space_path("lora"), {"method": "lora", "seed": 0, "augment": True, "epochs": 2})


def config(lr: float) -> dict:
    return {**LORA.fixed, **LORA.points_to_evaluate[0], "lr": lr}


def ray_trial(tmp_path, trial_id, lr, status="PENDING", epochs=()):
    """A stand-in for Ray's Trial: what the callbacks read, and a result.json holding `epochs` (epoch, acc)."""
    folder = tmp_path / f"trial_{trial_id}"
    folder.mkdir(exist_ok=True)
    (folder / "result.json").write_text("".join(json.dumps(report(e, a)) + "\n" for e, a in epochs))
    return SimpleNamespace(trial_id=trial_id, config=config(lr), status=status, path=str(folder),
                           relative_logdir=folder.name)


def report(epoch, accuracy):
    return {"epoch": epoch, "val_accuracy": accuracy, "epoch_seconds": 1.5, "node_id": "n1", "lr": 0.1}


def study(path, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")


def by_ray_id(trials):
    return {t.user_attrs["ray_trial_id"]: t for t in trials}


def test_the_mirror_follows_trials_live_and_a_resumed_driver_continues_it_without_duplicates(tmp_path):
    db = tmp_path / "optuna.db"
    mirror = monitor.StudyMirror(db, "s", LORA, TASK)
    saved = pickle.dumps(mirror)  # as Ray keeps it in tuner.pkl, before the search starts
    a, b, lost = (ray_trial(tmp_path, i, lr) for i, lr in (("a", 1e-3), ("b", 2e-3), ("lost", 3e-3)))
    trials = [a, b, lost]
    mirror.setup()
    mirror.on_trial_start(0, trials, a)
    [running] = study(db).trials
    assert running.state == TrialState.RUNNING and running.params["lr"] == 1e-3
    assert running.user_attrs["ray_trial_id"] == "a"
    for epoch, accuracy in ((1, 0.6), (2, 0.7)):
        mirror.on_trial_result(0, trials, a, report(epoch, accuracy))
    assert study(db).trials[0].intermediate_values == {1: 0.6, 2: 0.7}
    mirror.on_trial_complete(0, trials, a)
    mirror.on_trial_start(0, trials, b)
    mirror.on_trial_result(0, trials, b, report(1, 0.5))
    mirror.on_trial_start(0, trials, lost)  # started after Ray's last snapshot: Ray will not know it
    live = by_ray_id(study(db).trials)
    assert live["a"].state == TrialState.COMPLETE and live["a"].value == 0.7
    assert live["b"].state == TrialState.RUNNING and live["b"].intermediate_values == {1: 0.5}

    # The driver is killed. The resumed one restores the callback from tuner.pkl; Ray restores a (finished),
    # b (to be continued: its result.json has epoch 1), and c, which finished before the kill but whose end
    # the mirror never saw.
    mirror = pickle.loads(saved)
    a.status, b.status = "TERMINATED", "PENDING"
    b = ray_trial(tmp_path, "b", 2e-3, "PENDING", [(1, 0.5)])
    c = ray_trial(tmp_path, "c", 4e-3, "TERMINATED", [(1, 0.4)])  # ASHA stopped it after 1 of 2 epochs
    trials = [a, b, c]
    mirror.setup()
    mirror.on_trial_start(0, trials, b)
    live = by_ray_id(study(db).trials)
    assert sorted(live) == ["a", "b", "c", "lost"] and len(study(db).trials) == 4  # recognised, not repeated
    assert live["c"].state == TrialState.PRUNED and live["c"].intermediate_values == {1: 0.4}
    assert live["lost"].state == TrialState.FAIL and "lost" in live["lost"].user_attrs
    for epoch, accuracy in ((1, 0.55), (2, 0.8)):  # b repeats epoch 1 from its checkpoint: the last one counts
        mirror.on_trial_result(0, trials, b, report(epoch, accuracy))
    mirror.on_trial_complete(0, trials, b)
    assert by_ray_id(study(db).trials)["b"].intermediate_values == {1: 0.55, 2: 0.8}
    assert len(study(db).trials) == 4

    # At the end the study is what Ray ran: the lost trial goes (so the file is rebuilt), each trial once.
    final = [monitor.study_trial(LORA, t.config, [report(e, v) for e, v in curve], TASK, failed=False,
                                 ray_trial_id=t.trial_id, path=t.path)
             for t, curve in ((a, [(1, 0.6), (2, 0.7)]), (b, [(1, 0.5), (1, 0.55), (2, 0.8)]), (c, [(1, 0.4)]))]
    assert monitor.finish_study(db, "s", final, "maximize") == "rebuilt"
    done = study(db).trials
    assert [t.user_attrs["ray_trial_id"] for t in done] == ["a", "b", "c"]
    assert [t.state for t in done] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert done[1].intermediate_values == {1: 0.55, 2: 0.8} and done[1].value == 0.8
    assert not [*tmp_path.glob(".*.tmp"), *tmp_path.glob(".*.new")]  # no temporary file left
    assert monitor.finish_study(db, "s", final, "maximize") == "updated"  # a second pass changes nothing
    assert len(study(db).trials) == 3


def test_the_final_pass_completes_the_mirror_in_place_when_it_agrees_with_ray(tmp_path):
    db = tmp_path / "optuna.db"
    a, b = ray_trial(tmp_path, "a", 1e-3), ray_trial(tmp_path, "b", 2e-3)
    mirror = monitor.StudyMirror(db, "s", LORA, TASK)
    mirror.setup()
    mirror.on_trial_start(0, [a, b], a)
    mirror.on_trial_result(0, [a, b], a, report(1, 0.6))  # then Ctrl-C; Ray finishes a and b on --resume
    final = [monitor.study_trial(LORA, t.config, [report(1, 0.6), report(2, v)], TASK,
                                 failed=False,
                                 ray_trial_id=t.trial_id, path=t.path) for t, v in ((a, 0.7), (b, 0.9))]
    assert monitor.finish_study(db, "s", final, "maximize") == "updated"
    done = study(db).trials
    assert [(t.number, t.user_attrs["ray_trial_id"], t.state, t.value, t.user_attrs["epochs"]) for t in done] == [
        (0, "a", TrialState.COMPLETE, 0.7, 2), (1, "b", TrialState.COMPLETE, 0.9, 2)]
    assert study(db).best_value == 0.9


def test_a_failed_mirror_write_warns_once_and_does_not_stop_the_search(tmp_path, monkeypatch, capsys):
    db = tmp_path / "optuna.db"
    a = ray_trial(tmp_path, "a", 1e-3)
    mirror = monitor.StudyMirror(db, "s", LORA, TASK)
    mirror.setup()
    mirror.on_trial_start(0, [a], a)
    real = optuna.storages.RDBStorage.set_trial_intermediate_value

    def locked(*args):
        raise optuna.exceptions.StorageInternalError("database is locked")

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value", locked)
    mirror.on_trial_result(0, [a], a, report(1, 0.6))
    mirror.on_trial_result(0, [a], a, report(2, 0.7))
    assert capsys.readouterr().err.count("missed an update") == 1
    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value", real)
    mirror.on_trial_complete(0, [a], a)  # resynchronised: nothing is lost
    [done] = study(db).trials
    assert done.intermediate_values == {1: 0.6, 2: 0.7} and done.state == TrialState.COMPLETE


def test_trial_rows_keep_the_last_report_of_a_repeated_epoch():
    reports = [report(1, 0.61), report(1, 0.6), report(2, 0.55)]  # 2 epochs, the config's budget
    row = monitor.trial_row("x", config(1e-3), reports, "TERMINATED", "/r/trial_x", TASK)
    assert (row["status"], row["epochs"], row["best_epoch"], row["train_seconds"]) == ("COMPLETED", 2, 1, 3.0)
    assert json.loads(row["val_accuracy_curve"]) == [0.6, 0.55] and row["best_val_accuracy"] == 0.6
    assert monitor.trial_row("x", config(1e-3), reports[:1], "TERMINATED", "/r/trial_x", TASK)["status"] == "STOPPED"
    assert monitor.trial_row("y", config(1e-3), [], "RUNNING", None, TASK)["status"] == "RUNNING"


def test_the_study_and_tables_can_be_read_while_the_search_runs(watched_search):
    looks, passes, experiment = watched_search.looks, watched_search.finish_passes, watched_search.experiment
    assert len(looks) == 4  # one look per finished trial

    second = looks[1]  # after the second trial ended, with two still to finish
    finished = second["trials"][second["trials"]["status"].isin(["COMPLETED", "STOPPED"])]
    assert len(finished) == 2 and len(second["trials"]) == len(second["ray"])  # a row for every trial Ray has
    assert set(second["trials"]["status"]) - {"COMPLETED", "STOPPED"} <= {"RUNNING", "PENDING"}
    ended = {ray_id: values for ray_id, state, values in second["study"]
             if state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert set(ended) == set(finished["trial_id"])
    for _, row in finished.iterrows():  # each finished trial with its intermediate values, one per epoch
        assert [round(v, 6) for v in ended[row["trial_id"]].values()] == json.loads(row["val_accuracy_curve"])
    assert {state for _, state, _ in second["study"]} <= {TrialState.COMPLETE, TrialState.PRUNED,
                                                          TrialState.RUNNING}
    assert second["best"]["running"] is True and second["best"]["complete"] is False
    assert second["best"]["val_accuracy"] == pytest.approx(finished["best_val_accuracy"].max(), abs=1e-6)

    # At the end: the final trials.csv is the last live one; best.json says the search ended; the study
    # has each Ray trial once, as Ray ran it: the mirror already agreed with Ray's results, so it stays in place.
    assert passes == ["updated"]
    trials = pd.read_csv(experiment / "trials.csv")
    pd.testing.assert_frame_equal(looks[-1]["trials"], trials)
    best = json.loads((experiment / "best.json").read_text())
    assert best["running"] is False and best["complete"] is True and best["finished_trials"] == 4
    final = study(experiment / "optuna.db", experiment.name).trials
    assert sorted(by_ray_id(final)) == sorted(trials["trial_id"]) and len(final) == 4
    for _, row in trials.iterrows():
        trial = by_ray_id(final)[row["trial_id"]]
        assert trial.state == {"COMPLETED": TrialState.COMPLETE, "STOPPED": TrialState.PRUNED}[row["status"]]
        assert [round(v, 6) for v in trial.intermediate_values.values()] == json.loads(row["val_accuracy_curve"])
    assert not [*experiment.glob(".*.tmp"), *experiment.glob(".*.new")]  # no temporary file left

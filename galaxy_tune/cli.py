"""Command line: `python -m galaxy_tune COMMAND`, one subcommand per step of the workflow (see WORKFLOW).

Parses flags and hands them to the Python API (`galaxy_tune.api`), and prints a GalaxyTuneError as one line
(the traceback only with --debug). The parser imports nothing heavy, so `--help` answers at once;
docs/reference/cli.md is rendered from it.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from .errors import STOPPED_EXIT_CODE, GalaxyTuneError, Stopped
from .layout import RESULTS_DIR as DEFAULT_RESULTS
from .signals import STOP_SIGNALS, handlers_kept
from .train_config import DEVICES as DEVICE_NAMES  # no torch there: --help stays light

INTERRUPTED = {  # what Ctrl-C leaves, per command
    "prepare": "prepare stopped; nothing half-written is kept: run it again",
    "search": "finished trials are kept; continue with the same command and `--resume auto`, or "
              "`search METHOD --resume --name NAME`",
    "retrain": "finished runs are kept; continue with the same command and `--resume auto` (with --name)",
}
STOPPABLE = ("search", "retrain")  # SIGTERM and SIGUSR1 stop them as Ctrl-C does, exit code 75
TASK_NAMES = ("seed-top2", "smooth-featured", "kaggle-votes")  # tasks.TASKS, without importing pandas for --help
# search.strategy.SAMPLERS and SCHEDULERS, without importing Ray for --help (tests/test_cli.py checks they agree)
SAMPLER_NAMES = ("tpe", "tpe-independent", "random")
SCHEDULER_NAMES = ("asha", "hyperband", "fifo")
PURPOSE = "Search, retrain and test full and LoRA fine-tuning of ResNet-50 on Galaxy Zoo images."
WORKFLOW = """\
workflow (without --data-dir, every command uses the built-in demo data):
  python -m galaxy_tune demo-data results/demo-data    # optional: synthetic galaxies in the Kaggle layout
  python -m galaxy_tune prepare --data-dir galaxy-zoo  # validate, split and cache (search does it too)
  python -m galaxy_tune search lora --data-dir galaxy-zoo
  python -m galaxy_tune search full --data-dir galaxy-zoo
  python -m galaxy_tune retrain                        # retrain the best configs; test direct, full and LoRA
  python -m galaxy_tune predict --model results/retrain-TIME/lora-seed0/hf --images galaxy-zoo/images_test_rev1
  python -m galaxy_tune report                         # rebuild every report from disk

Each command's options: python -m galaxy_tune COMMAND --help

exit codes: 0 done; 2 bad input (one line names it and the fix); 75 search or retrain stopped by Ctrl-C, SIGTERM or
SIGUSR1, its finished work kept: the same command with --resume auto continues it; 130 Ctrl-C in another command"""


def cmd_demo_data(args) -> None:
    from .data.demo import write_demo_data

    out = write_demo_data(Path(args.out_dir), num_images=args.num_images, seed=args.seed)
    print(f"wrote {args.num_images} synthetic galaxies in the Kaggle layout to {out}")


def cmd_prepare(args) -> None:
    from . import api
    from .data.prepare import class_counts
    from .data.tasks import get_task

    prepared = api.prepare(args.data_dir, args.out, results_dir=args.results_dir, task=args.task,
                           min_vote=args.min_vote, image_size_px=args.image_size, crop_px=args.crop, seed=args.seed,
                           skip_bad=args.skip_bad, workers=args.workers)
    counts = class_counts(prepared)
    print(f"prepared {prepared.folder} (task {prepared.task}, cache {prepared.cache_path.name})")
    strata = get_task(prepared.task).strata_names  # the classes, or kaggle-votes' Q1 answers
    print(f"{'split':<6} " + " ".join(f"{name:>9}" for name in strata) + f" {'total':>7}")
    for split, row in counts.items():
        print(f"{split:<6} " + " ".join(f"{n:>9}" for n in row) + f" {sum(row):>7}")


def cmd_search(args) -> None:
    from . import api

    api.search(args.method, args.data_dir, results_dir=args.results_dir, name=args.name, space=args.space,
               num_samples=args.num_samples, max_epochs=args.max_epochs, image_size_px=args.image_size,
               crop_px=args.crop, task=args.task, min_vote=args.min_vote, skip_bad=args.skip_bad, workers=args.workers,
               model=args.model,
               cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, device=args.device,
               max_concurrent=args.max_concurrent, address=args.address,
               seed=args.seed, max_failures=args.max_failures, checkpoint_every_s=args.checkpoint_every,
               resume=args.resume, augment=not args.no_augment, sampler=args.sampler, scheduler=args.scheduler,
               mlflow=args.mlflow, storage=args.storage)


def cmd_retrain(args) -> None:
    from . import api

    api.retrain(args.results_dir, from_experiments=args.from_experiments, methods=args.methods, seeds=args.seeds,
                max_epochs=args.max_epochs, data_dir=args.data_dir, image_size_px=args.image_size, crop_px=args.crop,
                task=args.task, min_vote=args.min_vote, skip_bad=args.skip_bad, workers=args.workers, seed=args.seed,
                model=args.model, device=args.device, top_k=args.top_k, augment=not args.no_augment, name=args.name,
                resume=args.resume, mlflow=args.mlflow, storage=args.storage)


def cmd_predict(args) -> None:
    from . import api
    from .data.kaggle import CLASS_COLUMNS
    from .predict import output_csv

    table = api.predict(args.model, args.images, out_csv=args.out, tta=args.tta, image_size_px=args.image_size,
                        crop_px=args.crop, device=args.device)
    kaggle = " (Kaggle's submission format)" if list(table.columns[1:]) == CLASS_COLUMNS else ""
    print(f"wrote {len(table)} predictions to {output_csv(args.out)}{kaggle}")


def cmd_report(args) -> None:
    from . import api

    for report in api.report(args.experiments, results_dir=args.results_dir, out=args.out, storage=args.storage):
        print(f"wrote {report}")


def add_storage_flag(p, what: str) -> None:
    p.add_argument("--storage", metavar="URI", help="object storage, e.g. s3://bucket/prefix or gs://bucket/prefix "
                   "(an S3-compatible server: add ?endpoint_override=host:9000&scheme=http; credentials from the "
                   f"environment): {what}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m galaxy_tune", description=PURPOSE, epilog=WORKFLOW,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also accepted after "
                        "the command)")
    commands = parser.add_subparsers(dest="command", required=True)

    def device_flag(p, what: str):
        p.add_argument("--device", choices=DEVICE_NAMES,
                       help=f"where {what} (default: auto, CUDA when torch sees a GPU, else the CPU)")

    def mlflow_flag(p, what: str):
        p.add_argument("--mlflow", nargs="?", const="", metavar="URI", help=f"log to MLflow: {what}; URI: a "
                       "tracking server (http://host:5000) or sqlite:///mlflow.db; alone: MLFLOW_TRACKING_URI "
                       '(needs pip install "galaxy_tune[mlflow]") (default: no MLflow)')

    def results_flag(p):
        p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS,
                       help="where run outputs go (default: results)")

    def data_flags(p):
        p.add_argument("--data-dir", type=Path, help="Kaggle folder (training_solutions_rev1.csv, "
                       "images_training_rev1/) (default: the built-in demo data)")
        p.add_argument("--task", choices=TASK_NAMES, help="seed-top2 (the reference study's binary task), "
                       "smooth-featured (Q1, binary) or kaggle-votes (the Kaggle challenge: 37 vote fractions, RMSE) "
                       "(default: seed-top2)")
        p.add_argument("--image-size", type=int, help="pixels per side fed to the model (default: 224; demo data 64)")
        p.add_argument("--crop", type=int, help="centre-crop the 424 px frame to this many px first "
                       "(default: no crop; demo data 256)")
        p.add_argument("--seed", type=int, help="split seed, and the search's training seed (default: 0)")
        p.add_argument("--min-vote", type=float, help="smooth-featured: least winning vote fraction (default: 0.8)")
        p.add_argument("--skip-bad", action="store_true", help="drop missing or unreadable images instead of failing")
        p.add_argument("--workers", type=int, help="processes decoding images into the pixel cache; 1: in this "
                       "process (default: one per core)")
        results_flag(p)

    p = commands.add_parser("demo-data", help="write a synthetic data set in the Kaggle layout",
                            description="Write synthetic galaxies (smooth and spiral/barred, vote fractions that "
                            "obey the decision tree) in the Kaggle layout.")
    p.add_argument("out_dir", help="folder to write (e.g. results/demo-data)")
    p.add_argument("--num-images", type=int, default=600, help="galaxies to draw (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the drawing (default: 0)")
    p.set_defaults(run=cmd_demo_data)

    p = commands.add_parser("prepare", help="validate data, write the split manifest and the pixel cache")
    data_flags(p)
    p.add_argument("--out", help="output folder (default: results/prepared/<data>-<task>-seed<S>)")
    p.set_defaults(run=cmd_prepare)

    p = commands.add_parser("search", help="Ray Tune + Optuna search over one fine-tuning method")
    p.add_argument("method", choices=["full", "lora"], help="full fine-tuning or LoRA")
    data_flags(p)
    p.add_argument("--space", type=Path, help="search-space YAML (default: search_spaces/<method>.yaml)")
    p.add_argument("--num-samples", type=int, help="how many trials to run (default: 20; demo data 6)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial, the scheduler's budget (default: the space's "
                   "epochs; demo data 4)")
    p.add_argument("--model", help="a transformers ResNet (Hugging Face id or local folder, resnet50-random, tiny) "
                   "or a timm one (hf_hub:REPO such as hf_hub:mwalmsley/zoobot-encoder-resnet50, timm:ARCH with "
                   "random weights, or a folder in timm's Hub layout) (default: microsoft/resnet-50, falling back "
                   "to resnet50-random offline)")
    p.add_argument("--name", help="experiment name: one folder name inside --results-dir, of letters, digits and "
                   ". _ + - (default: search-<method>-<time>)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs each trial holds (default: 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs each trial holds, at most 1; fractions share a GPU, "
                   "e.g. 0.25 (default: 1 when the cluster has a GPU, else 0)")
    device_flag(p, "trials train; cpu: they ask for no GPU")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the resources allow)")
    p.add_argument("--address", help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting Ray "
                   "(default: start Ray on this machine)")
    p.add_argument("--max-failures", type=int, help="retries of a crashed trial from its checkpoint (default: 2)")
    p.add_argument("--checkpoint-every", type=float, metavar="SECONDS",
                   help="a trial checkpoints after an epoch once this long has passed since its last checkpoint, "
                   "and after its last epoch; 0: every epoch (default: 60)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="what proposes configs: tpe (multivariate, constant "
                   "liar when trials run at once), tpe-independent (one parameter at a time) or random "
                   "(default: tpe)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="what stops weak trials: asha, hyperband "
                   "(asynchronous, 3 brackets) or fifo (none: every trial runs --max-epochs) (default: asha)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue the stopped search --name; `--resume auto`: start it if --name does not exist "
                   "yet, else continue it after checking that this command's settings are the ones it started with "
                   "(one command for a first start and a requeue) (default: a new search; an existing --name is "
                   "refused)")
    p.add_argument("--no-augment", action="store_true", help="train without random flips / 90° rotations")
    mlflow_flag(p, "a parent run for the search, a nested run per trial with each epoch's metrics, kept up to date "
                "while it runs")
    add_storage_flag(p, "keep Ray's results (checkpoints, reports, its state) and the prepared data there; "
                     "--results-dir keeps the driver's working copy, and trials.csv, best.json, optuna.db and the "
                     "report are uploaded as they change; with --resume, a search found there continues here "
                     "(default: Ray's results in --results-dir)")
    p.set_defaults(run=cmd_search)

    p = commands.add_parser("retrain", help="retrain the top configs of each search and test direct, full and LoRA")
    data_flags(p)
    p.add_argument("--from", dest="from_experiments", nargs="+", help="search experiment folders to take "
                   "the top configs from (default: the latest finished search of each method)")
    p.add_argument("--methods", nargs="+", choices=["direct", "full", "lora"],
                   help="methods to test (default: direct full lora)")
    p.add_argument("--seeds", type=int, help="retrain each config with this many seeds (default: 3; demo data 2)")
    p.add_argument("--top-k", type=int, help="retrain the K best configs of each search and report the one with "
                   "the best mean val metric, accuracy or RMSE (default: 3; demo data 1)")
    p.add_argument("--max-epochs", type=int, help="cap the epochs of each recipe (default: the recipe's; "
                   "demo data 4)")
    p.add_argument("--model", help="backbone (default: the searches', else microsoft/resnet-50)")
    device_flag(p, "to train and test")
    p.add_argument("--no-augment", action="store_true", help="train without random flips / 90° rotations")
    p.add_argument("--name", help="the retrain's folder inside --results-dir, of letters, digits and . _ + - "
                   "(default: retrain-<time>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], help="continue the stopped "
                   "retrain --name, skipping its finished runs; `--resume auto`: start it if --name does not exist "
                   "yet; either way this command's settings must be the ones it started with (default: a new "
                   "retrain; an existing --name is refused)")
    mlflow_flag(p, "a parent run for the retrain, a nested run per method, config and seed with its test metrics "
                "and model, once it ends")
    add_storage_flag(p, "retrain the searches kept there (copied into --results-dir first; their prepared data "
                     "into this node's cache), and upload the finished retrain, models included (default: the "
                     "searches in --results-dir)")
    p.set_defaults(run=cmd_retrain)

    p = commands.add_parser("predict", help="classify a folder of galaxy JPEGs with a retrained model (a "
                                 "kaggle-votes model writes a Kaggle submission)")
    p.add_argument("--model", required=True, help="a retrain's <method>-seed<S>/hf folder, here or in object "
                   "storage (s3://.../hf, downloaded first; credentials from the environment)")
    p.add_argument("--images", type=Path, required=True, help="folder of galaxy JPEGs, e.g. images_test_rev1")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"),
                   help="CSV to write: GalaxyID and one column per output (default: predictions.csv); a folder "
                   "gets predictions.csv inside it")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations")
    p.add_argument("--image-size", type=int, help="pixels per side, only for a model without galaxy_tune.json "
                   "(default: the model's)")
    p.add_argument("--crop", type=int, help="centre crop in px, only for a model without galaxy_tune.json "
                   "(default: the model's)")
    device_flag(p, "to classify")
    p.set_defaults(run=cmd_predict)

    p = commands.add_parser("report", help="rebuild reports of search and retrain folders from disk")
    p.add_argument("experiments", nargs="*", help="experiment folders (default: all under --results-dir); with "
                   "--storage, names of folders there")
    p.add_argument("--out", type=Path, help="write the reports here, one folder per experiment (default: in each "
                   "experiment folder)")
    results_flag(p)
    add_storage_flag(p, "report the searches and retrains kept there: copied into --results-dir (without "
                     "weights), reported, and their reports uploaded (default: --results-dir alone)")
    p.set_defaults(run=cmd_report)

    from .cli_bench import add_bench_parser  # here: cli_bench reads this module's constants

    add_bench_parser(commands)
    for _, subparser in list(subparsers(parser)):
        # After the command too (`search lora --debug`); SUPPRESS keeps the top-level value when absent here.
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the traceback of an error")
    return parser


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every subcommand's parser below `parser` as (command words, parser), depth first: ("bench", "gpu") ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield (*path, name), subparser
                yield from subparsers(subparser, (*path, name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stop_signals(args.command in STOPPABLE):
            args.run(args)
    except Stopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except GalaxyTuneError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {INTERRUPTED.get(args.command, f'{args.command} stopped')}", file=sys.stderr)
        return STOPPED_EXIT_CODE if args.command in STOPPABLE else 130
    return 0


def stop_signals(active: bool):
    """SIGTERM and SIGUSR1, what Slurm and Kubernetes send before they kill a job, stop the command as Ctrl-C does
    (a KeyboardInterrupt). While Ray Tune runs a search, the search's own handlers take over
    (`search.faults.GracefulStop`). The caller's handlers are back afterwards."""
    return handlers_kept(STOP_SIGNALS, signal.default_int_handler) if active else contextlib.nullcontext()

"""The `bench` command of the command line: its parser (`add_bench_parser`, called by `cli.build_parser`) and
the handlers of `bench {prepare,loader,train,search,gpu}`. Like `cli`, it imports nothing heavy until a benchmark
runs.
"""

from __future__ import annotations

from pathlib import Path

from .cli import DEFAULT_RESULTS, DEVICE_NAMES, add_storage_flag


def cmd_bench_loader(args) -> None:
    from .bench.loader import bench_loader

    save_if_asked(args, bench_loader(
        args.data_dir, args.results_dir, image_size_px=args.image_size, batch_size=args.batch_size,
        workers=args.workers, epochs=args.epochs, crop_px=args.crop, readers=args.readers, device=args.device,
        threads=args.threads))


def cmd_bench_train(args) -> None:
    from .bench.training import bench_train

    save_if_asked(args, bench_train(
        args.data_dir, args.results_dir, model=args.model, image_size_px=args.image_size, crop_px=args.crop,
        batch_size=args.batch_size, method=args.method, lora_rank=args.lora_rank,
        lora_batchnorm=args.lora_batchnorm, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
        eval_batches=args.eval_batches, device=args.device, compile_model=args.compile, threads=args.threads))


def cmd_bench_search(args) -> None:
    from .bench.searching import bench_search

    save_if_asked(args, bench_search(
        args.data_dir, args.results_dir, method=args.method, num_samples=args.num_samples,
        max_epochs=args.max_epochs, model=args.model, image_size_px=args.image_size, crop_px=args.crop,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, device=args.device, seed=args.seed,
        repeats=args.repeats, storage=args.storage, **({"strategies": args.strategies} if args.strategies else {})))


def cmd_bench_gpu(args) -> None:
    from .bench.gpu import bench_gpu

    save_if_asked(args, bench_gpu(args.results_dir, dry_run=args.dry_run))


def cmd_bench_prepare(args) -> None:
    from .bench.preparing import bench_prepare

    save_if_asked(args, bench_prepare(args.data_dir, args.results_dir, image_size_px=args.image_size,
                                      crop_px=args.crop, rounds=args.rounds, workers=args.workers))


def save_if_asked(args, figures: dict) -> None:
    """Write the figures to --json FILE when given."""
    if args.json:
        from .bench.measure import write_json

        write_json(figures, args.json)
        print(f"figures written to {args.json}")


def add_bench_parser(commands) -> None:
    """Add `bench {prepare,loader,train,search,gpu}` to the CLI's subparsers."""
    bench = commands.add_parser("bench", help="measure the data path, training speed and the search; check a GPU")
    kinds = bench.add_subparsers(dest="benchmark", required=True)

    def common(p, image_size: int, crop: int | None):
        p.add_argument("--data-dir", type=Path, help="Kaggle folder (default: the built-in demo data)")
        p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS,
                       help="where run outputs go (default: results)")
        p.add_argument("--image-size", type=int, default=image_size, help=f"pixels per side (default: {image_size})")
        p.add_argument("--crop", type=int, default=crop, help="centre-crop the 424 px frame first "
                       f"(default: {crop or 'no crop'})")
        p.add_argument("--json", type=Path, help="also write the figures to this JSON file (default: none)")

    def device(p, what: str):
        p.add_argument("--device", choices=DEVICE_NAMES, help=f"{what} (default: auto, CUDA when torch sees a GPU)")

    p = kinds.add_parser("prepare", help="images/s of prepare with 1 decoding process vs one per core, in turns")
    common(p, 224, None)
    p.add_argument("--rounds", type=int, default=3, help="rounds of each, in turns, each into a fresh folder "
                   "(default: 3)")
    p.add_argument("--workers", type=int, help="processes to compare with 1 (default: one per core)")
    p.set_defaults(run=cmd_bench_prepare)

    p = kinds.add_parser("loader", help="images/s of galaxy_tune's data path vs the reference PIL DataLoader")
    common(p, 224, None)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference pipeline "
                   "(default: 0)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per pipeline, the pipelines taking turns epoch "
                   "by epoch; the first round is a warm-up, each later one gives a ratio (default: 6)")
    p.add_argument("--readers", type=int, default=2, help="concurrent processes for the memory check (default: 2)")
    device(p, "where batches go")
    p.add_argument("--threads", type=int, help="torch threads of both pipelines (default: torch's, one per core)")
    p.set_defaults(run=cmd_bench_loader)

    p = kinds.add_parser("train", help="training and eval images/s and peak memory of fit's loop, per method")
    common(p, 224, None)
    p.add_argument("--model", default="resnet50-random", help="Hub id or folder, resnet50-random or tiny "
                   "(default: resnet50-random)")
    p.add_argument("--method", nargs="+", choices=["full", "lora"], default=["full"],
                   help="one method, or `full lora` to compare them in one run, round by round (default: full)")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step (default: 32)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA's rank r (default: 8)")
    p.add_argument("--lora-batchnorm", choices=["frozen", "stats", "affine"], default="stats",
                   help="LoRA's BatchNorm: frozen (folded into the convolutions in training), stats (the reference "
                   "recipe's: batch statistics, running ones updated) or affine (γ, β trained too) (default: stats)")
    p.add_argument("--steps", type=int, help="timed steps per method (default: 100 on CUDA, 4 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per method (default: 30 on CUDA, 1 on CPU)")
    p.add_argument("--rounds", type=int, help="the timed steps in this many rounds, methods in turns "
                   "(default: 5 on CUDA, 4 on CPU)")
    p.add_argument("--eval-batches", type=int, help="timed eval batches of 64 per model, 0: none "
                   "(default: 20 on CUDA, 2 on CPU)")
    device(p, "where to train")
    p.add_argument("--compile", action="store_true", help="torch.compile the training model")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.set_defaults(run=cmd_bench_train)

    p = kinds.add_parser("search", help="search strategies, each run --repeats times, against random search with "
                         "the full epoch budget: best so far against trial-epochs, with 95 %% bands")
    common(p, 64, 256)
    p.add_argument("--method", choices=["full", "lora"], default="full", help="method searched (default: full)")
    p.add_argument("--model", default="tiny", help="backbone of every trial (default: tiny)")
    p.add_argument("--num-samples", type=int, default=12, help="trials per search (default: 12)")
    p.add_argument("--max-epochs", type=int, default=6, help="epoch budget per trial (default: 6)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each strategy, sampler seeds --seed, --seed + 1, "
                   "... (default: 3)")
    p.add_argument("--strategies", nargs="+", metavar="SAMPLER+SCHEDULER",
                   help="the strategies compared, random+fifo (the baseline) among them (default: random+fifo "
                   "tpe+fifo tpe-independent+asha tpe+asha tpe+hyperband)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial holds (default: 1)")
    p.add_argument("--gpus-per-trial", type=float, help="as `search`: fractions share a GPU, e.g. 0.25 (default: "
                   "1 when the cluster has a GPU, else 0)")
    device(p, "where trials train, as `search`")
    p.add_argument("--seed", type=int, default=0, help="the split's and trials' training seed, and the first "
                   "repeat's sampler seed (default: 0)")
    add_storage_flag(p, "each search's results and the prepared data, as `search --storage` keeps them, in a "
                     "folder of the benchmark's name (default: in --results-dir)")
    p.set_defaults(run=cmd_bench_search)

    p = kinds.add_parser("gpu", help="check a GPU machine in one go (about 10 min): training speed full and LoRA, "
                         "torch.compile, gradients and LoRA under bf16 vs fp32, a resumed checkpoint, kaggle-votes, "
                         "LoRA trials sharing the GPU in a search, retrain vs predict")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where run outputs go "
                   "(default: results)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with a tiny model and 32 px images, in "
                   "about a minute: checks that the script runs, not the machine")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file (default: none)")
    p.set_defaults(run=cmd_bench_gpu)

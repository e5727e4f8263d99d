"""`coordinator run` and `coordinator report`: parse options only; CoordinatorConfig validates."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from edgetrain import cli_options as opt
from edgetrain.aggregation import AGGREGATORS, MEAN
from edgetrain.cli_util import count_or_auto, entry, made_output_folder, read_token, setup_logging
from edgetrain.cores import parse_cores, validate_cores
from edgetrain.errors import ConfigError
from edgetrain.models import DEFAULT_LR, MODELS
from edgetrain.recipes import LR_DECAY, SKEW_THRESHOLD
from edgetrain.serde import UPDATE_DTYPES
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.split import parse_count

from .admission import Limits
from .config import UPLOAD_SLOTS, CoordinatorConfig

if TYPE_CHECKING:
    from .experiments import BenchSettings

LR_HELP = "Learning rate (default: the model's: {}).".format(", ".join(
    [f"{DEFAULT_LR:g}"] + [f"{name} {m.lr:g}" for name, m in MODELS.items() if m.lr != DEFAULT_LR]))


# Options the bench commands share (one help text each).
DatasetOpt = Annotated[str, typer.Option(help="tweets (embedded) or mnist (with --data-dir), ...")]
ModelOpt = Annotated[str, typer.Option(help="Model name, e.g. text-cnn, text-ngram (default: the data set's).")]
LimitOpt = Annotated[int, typer.Option(help="Use only the first N train and test examples (0: all).")]
LrOpt = Annotated[Optional[float], typer.Option(help=LR_HELP)]  # noqa: UP045
OptimizerOpt = Annotated[str, typer.Option(help="sgd, adam or adadelta.")]
MomentumOpt = Annotated[float, typer.Option(help="SGD momentum.")]
LrDecayOpt = Annotated[float, typer.Option(help="Learning rate x this per epoch (1: constant).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of data split, weights and batches.")]
QuietWaitOpt = Annotated[float, typer.Option(help="Before each run, wait up to N s for a quiet machine.")]
MaxOtherLoadOpt = Annotated[float, typer.Option(help="Rerun runs others disturbed more (% CPU).")]
RetriesOpt = Annotated[int, typer.Option(help="At most this many reruns of a disturbed run.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar.")]


def parse_gpus(text: str) -> tuple[str, ...]:
    """`--local-gpus 0,1` or `all` -> ("cuda:0", "cuda:1")."""
    if not text:
        return ()
    if text == "all":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--local-gpus all: torch sees no CUDA device here")
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--local-gpus takes ids like 0,1 or 'all', not {text!r}") from exc
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in ids if not 0 <= i < count]
    if missing:
        raise ConfigError(f"--local-gpus {text}: torch sees {count} CUDA device(s) here, so no cuda:{missing[0]}")
    return tuple(f"cuda:{i}" for i in ids)


def auto_local_agents(spec: RunSpec, where: DataLocation, local_steps: int | None, cores: list[int]) -> int:
    """`--local-agents auto`: agents x threads over `cores`, cached or measured (edgetrain.split).

    Local agents average every K local steps, so the probe's processes train alone and wait for each other every K
    steps ("lockstep"), as the agents of a round do.
    """
    from rich.console import Console

    from edgetrain.split import choose_split, split_table

    if local_steps is None:  # the recipe's K is known once the data is loaded; K barely moves the split
        local_steps = 8
    if local_steps < 1:
        raise ConfigError(f"--local-steps must be at least 1, got {local_steps}")
    console = Console(stderr=True)
    split = choose_split(spec, where, cores, mode="lockstep", sync_every=local_steps,
                         cache_dir=where.cache_dir, say=console.print)
    console.print(split_table(split, title="--local-agents auto"))
    return split.processes


def _train(cfg: CoordinatorConfig, *, fork_agents: bool = False) -> int:
    """`coordinator run` once its options are a config: serve, run the rounds until stopped, print the summary."""
    import psutil
    from rich.console import Console

    from .run import Coordinator, quality_tables, slow_node, summary_table

    console = Console()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # start-up is counted from the command: this process's start, imports included
    coord = Coordinator(cfg, stop=stop, keep_history=False,  # a run of days must not grow with its rounds
                        started_at=psutil.Process().create_time(), fork_agents=fork_agents)
    coord.start()
    console.print(f"coordinator listening on {cfg.host}:{coord.port}; run dir {cfg.run_dir}")
    result = coord.run()
    console.print(summary_table(result))
    if (slow := slow_node(result)) is not None:
        console.print(slow, soft_wrap=True, highlight=False, markup=False)  # one line, for people and for grep
    if result.choice is not None:
        for table in quality_tables(result.choice):
            console.print(table)
    return 0


def make_app() -> typer.Typer:
    app = typer.Typer(add_completion=False,
                      help="edgetrain coordinator: synchronous data-parallel rounds over gRPC.")

    @app.command()
    def run(
        dataset: Annotated[str, typer.Option(
            help="tweets, tweeteval (--data-dir: any TweetEval task), tweeteval-sentiment, mnist, mnist-5k, csv, tsv."
        )] = "tweets",
        model: Annotated[str, typer.Option(help="Model name (default: the data set's).")] = "",
        data_dir: opt.DataDirOpt = None,
        data_path: opt.DataPathOpt = None,
        test_path: opt.TestPathOpt = None,
        val_path: opt.ValPathOpt = None,
        cache_dir: opt.CacheDirOpt = None,
        no_download: opt.NoDownloadOpt = False,
        limit: Annotated[int, typer.Option(help="Use only the first N train and test examples (0: all).")] = 0,
        max_len: Annotated[int, typer.Option(help="Text: tokens per example.")] = 64,
        seed: Annotated[int, typer.Option(help="Seed of split, shards, initial weights and batches.")] = 0,
        batch_size: Annotated[int, typer.Option(help="Batch per worker per step.")] = 64,
        lr: Annotated[Optional[float], typer.Option(help=LR_HELP)] = None,  # noqa: UP045
        optimizer: Annotated[str, typer.Option(help="sgd, adam or adadelta.")] = "adam",
        momentum: MomentumOpt = 0.0,
        weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 0.0,
        local_steps: Annotated[str, typer.Option(
            callback=count_or_auto,
            help="K: local steps per round (1 = synchronous SGD), or auto: the recipe's (32 for text-ngram, 8 "
                 "otherwise), raised up to 4x on a slow link.")] = "auto",
        rounds: Annotated[Optional[int], typer.Option(  # noqa: UP045
            help="Stop after this many rounds (a round's K may grow on a slow link: see --local-steps).")] = None,
        epochs: Annotated[Optional[float], typer.Option(  # noqa: UP045
            help="Stop after this many passes over the data (default, with no other stopping rule: the "
                 "recipe's, 4 or more for text-ngram, 3 otherwise).")] = None,
        metric: Annotated[str, typer.Option(
            help="What decides the run: accuracy, macro-f1, macro-recall or f1:<class> "
                 "(default: the data set's).")] = "",
        target: Annotated[Optional[float], typer.Option(  # noqa: UP045
            help="Stop once --metric reaches this (0-1) on val (on test without a val split).")] = None,
        target_accuracy: Annotated[Optional[float], typer.Option(  # noqa: UP045
            help="--target with --metric accuracy (the old name).")] = None,
        min_agents: Annotated[int, typer.Option(help="Agents to wait for (default: the local ones, or 1).")] = 0,
        local_agents: Annotated[str, typer.Option(
            callback=count_or_auto,
            help="Start N agents here, pinned to disjoint cores (more agents than cores share them); auto: the "
                 "fastest split of the cores, measured once per model and cores.")] = "0",
        local_workers: Annotated[int, typer.Option(help="Workers per local agent.")] = 1,
        local_gpus: Annotated[str, typer.Option(help="GPUs as local workers: 0,1 or all.")] = "",
        cores: Annotated[str, typer.Option(
            help="Pin the coordinator itself (its gRPC server, aggregation, evaluation) to these cores, as for "
                 "taskset: 0 or 0-1; local agents then take the others. Default: unpinned.")] = "",
        host: Annotated[str, typer.Option(help="Address to serve gRPC on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="gRPC port (0: any free port).")] = 50051,
        metrics_port: Annotated[Optional[int], typer.Option(help="Serve /metrics and /sd here.")] = None,  # noqa: UP045
        metrics_host: opt.MetricsHostOpt = "127.0.0.1",
        round_timeout: Annotated[float, typer.Option(
            help="A round's hard deadline in seconds (rounds close sooner by their measured times).")] = 600.0,
        quorum: Annotated[int, typer.Option(
            help="Updates a round holds before it gives up on a participant past its measured deadline (k of the "
                 "n; --round-timeout still bounds the wait). 1: any one; n: wait for all.")] = 1,
        join_timeout: Annotated[float, typer.Option(help="Wait this long for --min-agents.")] = 600.0,
        eval_every: Annotated[str, typer.Option(
            callback=count_or_auto, help="Evaluate every N rounds, or auto: whenever that keeps evaluation within "
                                         "5 % of the wall time (and after the last round).")] = "auto",
        checkpoint_every: Annotated[str, typer.Option(
            callback=count_or_auto, help="Checkpoint every N rounds, or auto (as --eval-every), and at the "
                                         "end.")] = "auto",
        upload_slots: Annotated[int, typer.Option(help="Uploads taken at once; the others wait.")] = UPLOAD_SLOTS,
        max_agents: Annotated[int, typer.Option(help="Agents admitted at once (docs/security.md, Limits).")] = (
            Limits.max_agents),
        sd_any_host: Annotated[bool, typer.Option(
            help="List agents' /metrics on any host they name in /sd (default: only their own address).")] = False,
        staging_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            help="Where uploads wait until whole (default: the temp dir).")] = None,
        aggregator: Annotated[str, typer.Option(help=f"{', '.join(AGGREGATORS[:-1])} or {AGGREGATORS[-1]}.")] = MEAN,
        trim: Annotated[float, typer.Option(help="Trimmed mean: fraction cut at each end.")] = 0.2,
        balance: Annotated[bool, typer.Option(help="Size each node's work by its speed.")] = False,
        timed_rounds: Annotated[Optional[bool], typer.Option(  # noqa: UP045
            "--timed-rounds/--no-timed-rounds",
            help="Each agent trains for the median agent's time for K steps (fewer steps if slower, up to 2K if "
                 "faster), so none waits for the slowest. Default: on with an auto --local-steps, IID shards and no "
                 "--balance.")] = None,
        shard_scheme: Annotated[str, typer.Option(help="iid or dirichlet.")] = "iid",
        alpha: Annotated[float, typer.Option(help="Dirichlet concentration (smaller: more skew).")] = 0.5,
        update_dtype: Annotated[str, typer.Option(
            help="Uploads in float32, float16, bfloat16 or int8 (anything but float32 with error feedback), or auto: "
                 "float32 until a link needs fewer bytes.")] = "auto",
        class_weighting: Annotated[str, typer.Option(
            help=f"none, balanced, or auto: balanced when --metric is not accuracy and the largest class of train is "
                 f">= {SKEW_THRESHOLD:g}x the smallest.")] = "auto",
        lr_decay: Annotated[Optional[float], typer.Option(  # noqa: UP045
            help=f"Multiply the learning rate by this each epoch (default: {LR_DECAY:g}; text-ngram on a small set "
                 "spreads the same decay over its longer run).")] = None,
        run_dir: Annotated[Optional[Path], typer.Option(help="Checkpoints, log and final model.")] = None,  # noqa: UP045
        resume: Annotated[bool, typer.Option(help="Resume from --run-dir's checkpoint.")] = False,
        auto_resume: Annotated[bool, typer.Option(
            "--auto-resume", help="Resume if --run-dir holds a run, else start one there (restarted pods).")] = False,
        token_env: opt.TokenEnvOpt = "EDGETRAIN_TOKEN",
        token_file: opt.TokenFileOpt = None,
        tls_cert: Annotated[Optional[Path], typer.Option(help="Server certificate (PEM).")] = None,  # noqa: UP045
        tls_key: Annotated[Optional[Path], typer.Option(help="Server key (PEM).")] = None,  # noqa: UP045
        tls_client_ca: Annotated[Optional[Path], typer.Option(help="Require client certs from this CA.")] = None,  # noqa: UP045
        insecure: Annotated[bool, typer.Option(help="Allow plaintext on a non-loopback address.")] = False,
        progress: Annotated[bool, typer.Option(help="Show a live progress bar.")] = True,
        log_level: opt.LogLevelOpt = "warning",
    ) -> int:
        """Run a training: wait for agents, run synchronous rounds, evaluate, checkpoint, print a summary."""
        from .run import agent_cores, holds_run

        setup_logging(log_level)
        gpus = parse_gpus(local_gpus)
        n_local = parse_count(local_agents, "--local-agents")
        k = parse_count(local_steps, "--local-steps")
        dtype_auto = update_dtype.strip().lower() == "auto"
        if not dtype_auto and update_dtype not in UPDATE_DTYPES:
            raise ConfigError(f"unknown update dtype {update_dtype!r}; choose from {', '.join(UPDATE_DTYPES)} or auto")
        if auto_resume:
            if run_dir is None:
                raise ConfigError("--auto-resume needs --run-dir: the folder that holds the run, or will")
            resume = holds_run(run_dir)
        spec = RunSpec(
            dataset=dataset, model=model, seed=seed, batch_size=batch_size, lr=lr, optimizer=optimizer,
            momentum=momentum, weight_decay=weight_decay, shard_scheme=shard_scheme, dirichlet_alpha=alpha,
            max_len=max_len, limit=limit, update_dtype="float32" if dtype_auto else update_dtype,
            class_weighting=class_weighting,
            lr_decay=lr_decay,
        )
        where = DataLocation(data_dir, data_path, cache_dir, not no_download, test_path, val_path)
        own_cores = tuple(validate_cores(parse_cores(cores))) if cores else ()  # before a probe, not after
        # a count: nothing ran torch or gRPC in this process yet, so the local agents may be forked (procs.may_fork);
        # auto's probe may have run torch here
        fork_agents = n_local is not None
        if n_local is None:
            n_local = auto_local_agents(spec, where, k, agent_cores(own_cores, warn=False))
        cfg = CoordinatorConfig(
            spec=spec, where=where, host=host, port=port, metrics_host=metrics_host, metrics_port=metrics_port,
            local_steps=k, update_dtype_auto=dtype_auto, rounds=rounds, epochs=epochs,
            target_accuracy=target_accuracy, metric=metric,
            target=target,
            min_agents=min_agents, join_timeout=join_timeout,
            round_timeout=round_timeout, quorum=quorum, eval_every=parse_count(eval_every, "--eval-every"),
            checkpoint_every=parse_count(checkpoint_every, "--checkpoint-every"),
            upload_slots=upload_slots, staging_dir=staging_dir, aggregator=aggregator, trim=trim, balance=balance,
            timed_rounds=timed_rounds, local_agents=n_local, local_workers=local_workers, local_devices=gpus,
            cores=own_cores,
            run_dir=run_dir or (None if resume else Path("runs") / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"),
            resume=resume,
            token=read_token(token_env, token_file), tls_cert=tls_cert, tls_key=tls_key,
            tls_client_ca=tls_client_ca, insecure=insecure, progress=progress,
            limits=Limits(max_agents=max_agents, any_metrics_host=sd_any_host),
        )
        return _train(cfg, fork_agents=fork_agents)

    @app.command()
    def report(
        run_dir: Annotated[Path, typer.Argument(help="A finished (or running) run's folder.")],
        out: Annotated[Optional[Path], typer.Option(help="Where to write the PNGs (default: RUN_DIR).")] = None,  # noqa: UP045
    ) -> int:
        """Turn a run's log into PNG plots: accuracy vs time per node, round-time breakdown, confusion matrix."""
        from .report import write_report

        with made_output_folder(out, "--out") if out is not None else nullcontext(run_dir) as folder:
            for path in write_report(run_dir, folder):
                typer.echo(str(path))
        return 0

    app.add_typer(make_bench_app(), name="bench")
    return app


def make_bench_app() -> typer.Typer:
    """`coordinator bench parallel|affinity`: the paper's experiments and the peers, measured here."""
    bench = typer.Typer(add_completion=False, help="Reproduce the paper's experiments and compare with PyTorch peers.")

    @bench.command()
    def parallel(
        dataset: DatasetOpt = "tweets",
        model: ModelOpt = "",
        data_dir: opt.DataDirOpt = None,
        limit: LimitOpt = 0,
        epochs: Annotated[float, typer.Option(help="Passes over the training split, for every method.")] = 1.0,
        agents: Annotated[int, typer.Option(help="Local agents / DDP processes (0: one per allowed core).")] = 0,
        batch_size: Annotated[int, typer.Option(help="Batch per worker per step.")] = 64,
        local_steps: Annotated[int, typer.Option(help="edgetrain: K local steps per round.")] = 8,
        lr: LrOpt = None,
        optimizer: OptimizerOpt = "adam",
        momentum: MomentumOpt = 0.0,
        lr_decay: LrDecayOpt = LR_DECAY,
        seed: SeedOpt = 0,
        repeats: Annotated[int, typer.Option(help="Runs of each method (medians are reported).")] = 1,
        target_accuracy: Annotated[Optional[float], typer.Option(help="Also time reaching this accuracy.")] = None,  # noqa: UP045
        until: Annotated[str, typer.Option(
            help="Time to target: train every method until METRIC=VALUE (accuracy=0.99, macro-f1=0.6); "
                 "--epochs is then the budget.")] = "",
        ks: Annotated[str, typer.Option(help="With --until: the local steps the K search tries.")] = "1,2,4,8,16",
        eval_every_epochs: Annotated[float, typer.Option(
            help="With --until: evaluate every method after every this many epochs.")] = 0.25,
        quiet_wait: QuietWaitOpt = 0.0,
        max_other_load: MaxOtherLoadOpt = 100.0,
        retries: RetriesOpt = 3,
        out: Annotated[Optional[Path], typer.Option(help="Folder for parallel.md/.csv/.png.")] = None,  # noqa: UP045
        progress: ProgressOpt = True,
    ) -> int:
        """Serial vs data-parallel (edgetrain) vs plain PyTorch and DDP vs GPU: time, accuracy, speed-up."""
        import sys

        from . import experiments as ex

        settings = ex.BenchSettings(dataset=dataset, model=model, data_dir=data_dir, limit=limit, epochs=epochs,
                                    batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                                    lr_decay=lr_decay,
                                    seed=seed, repeats=repeats,
                                    quiet_wait=quiet_wait, max_other_load=max_other_load, retries=retries)
        if until:
            return _parallel_until(settings, until, ks, eval_every_epochs, agents, target_accuracy, out, progress)
        folder = out or Path("runs") / f"bench-parallel-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        with made_output_folder(folder, "--out"):
            report = ex.run_parallel(settings, agents=agents or None, local_steps=local_steps,
                                     target_accuracy=target_accuracy, progress=progress)
        paths = ex.write_parallel(report, folder, command=" ".join(["coordinator", *sys.argv[1:]]))
        console = ex.console()
        console.print(ex.rich_table(f"bench parallel: {dataset}, {report.facts.model}",
                                    ex.parallel_headers(repeats), ex.parallel_cells(report),
                                    caption=report.machine.describe()))
        for line in ex.parallel_ratios(report):
            console.print(f"  {line}")
        console.print("wrote " + ", ".join(str(p) for p in paths))
        return 0

    @bench.command()
    def affinity(
        dataset: DatasetOpt = "tweets",
        model: ModelOpt = "",
        data_dir: opt.DataDirOpt = None,
        limit: LimitOpt = 0,
        epochs: Annotated[float, typer.Option(help="Passes over the training split per configuration.")] = 1.0,
        batch_size: Annotated[int, typer.Option(help="Batch per step (per process for layouts).")] = 64,
        lr: LrOpt = None,
        optimizer: OptimizerOpt = "adam",
        momentum: MomentumOpt = 0.0,
        lr_decay: LrDecayOpt = LR_DECAY,
        seed: SeedOpt = 0,
        repeats: Annotated[int, typer.Option(help="Runs of each configuration.")] = 3,
        affinity: Annotated[str, typer.Option(help="Core counts 1,2,4,8 or sets 0;0,1;0-3.")] = "",
        layout: Annotated[str, typer.Option(help="Processes x threads, e.g. 1x2,2x1 (DDP over gloo).")] = "",
        quiet_wait: QuietWaitOpt = 0.0,
        max_other_load: MaxOtherLoadOpt = 100.0,
        retries: RetriesOpt = 3,
        out: Annotated[Optional[Path], typer.Option(help="Folder for affinity.md/.csv/.png.")] = None,  # noqa: UP045
        progress: ProgressOpt = True,
    ) -> int:
        """The CPU-affinity sweep of the paper's Table 1: processing time per core set, % gain vs slowest."""
        import sys

        from . import experiments as ex

        settings = ex.BenchSettings(dataset=dataset, model=model, data_dir=data_dir, limit=limit, epochs=epochs,
                                    batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                                    lr_decay=lr_decay,
                                    seed=seed, repeats=repeats,
                                    quiet_wait=quiet_wait, max_other_load=max_other_load, retries=retries)
        sets = ex.parse_affinity(affinity) if affinity else None
        layouts = ex.parse_layouts(layout) if layout else None
        folder = out or Path("runs") / f"bench-affinity-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        with made_output_folder(folder, "--out"):
            report = ex.run_affinity(settings, sets=sets, layouts=layouts, progress=progress)
        paths = ex.write_affinity(report, folder, command=" ".join(["coordinator", *sys.argv[1:]]))
        console = ex.console()
        console.print(ex.rich_table(f"bench affinity: {dataset}, {report.facts.model}",
                                    ex.affinity_headers(repeats), ex.affinity_cells(report),
                                    caption=report.machine.describe()))
        chosen = ex.chosen_sentence(report)
        if chosen:
            console.print(chosen.replace("`", ""))
        console.print("wrote " + ", ".join(str(p) for p in paths))
        return 0

    return bench


def _parallel_until(settings: BenchSettings, until: str, ks: str, eval_every_epochs: float, agents: int,
                    target_accuracy: float | None, out: Path | None, progress: bool) -> int:
    """`bench parallel --until`: every method to a target (coordinator.bench_ttt)."""
    import sys

    from . import bench_ttt as ttt
    from . import experiments as ex

    if target_accuracy is not None:
        raise ConfigError("--until and --target-accuracy both set a target: give one of them")
    target, candidates = ttt.parse_target(until), ttt.parse_ks(ks)
    folder = out or Path("runs") / f"bench-parallel-until-{settings.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    with made_output_folder(folder, "--out"):
        report = ttt.run_ttt(settings, target, agents=agents or None, ks=candidates,
                             eval_every_epochs=eval_every_epochs, progress=progress)
    paths = ttt.write_ttt(report, folder, command=" ".join(["coordinator", *sys.argv[1:]]))
    console = ex.console()
    console.print(ex.rich_table(f"bench parallel --until {target}: {settings.dataset}, {report.facts.model}",
                                ttt.ttt_headers(target), ttt.ttt_cells(report), caption=report.machine.describe()))
    for line in ttt.verdict(report):
        console.print(f"  {line}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


main = entry(make_app, "coordinator")

"""`edge-agent start`: parse options only; AgentConfig validates, AgentRunner runs."""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgetrain import cli_options as opt
from edgetrain.cli_util import count_or_auto, entry, read_token, setup_logging
from edgetrain.cores import resolve_cores
from edgetrain.errors import EdgetrainError
from edgetrain.spec import DataLocation
from edgetrain.split import parse_count


def make_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, help="Edge agent: trains pinned to the cores it is given.")

    @app.callback()
    def _root() -> None:
        """Edge agent for edgetrain (a callback keeps `edge-agent start` a named command)."""

    @app.command()
    def start(
        coordinator: Annotated[str, typer.Option(help="Coordinator address HOST:PORT.")],
        cores: Annotated[str, typer.Option(help="Cores to pin to, as for taskset: 0-3,8 or 0-10:2; auto: those this "
                                           "process may use (affinity, cgroup CPU quota); auto-N keeps N free.")],
        name: Annotated[Optional[str], typer.Option(help="Stable node name (default: host name).")] = None,  # noqa: UP045
        workers: Annotated[str, typer.Option(
            callback=count_or_auto,
            help="Training processes, each on its own core group; auto: the fastest split, measured once per model "
                 "and cores.")] = "1",
        device: Annotated[str, typer.Option(help="cpu or cuda:N.")] = "cpu",
        data_dir: opt.DataDirOpt = None,
        data_path: opt.DataPathOpt = None,
        test_path: opt.TestPathOpt = None,
        val_path: opt.ValPathOpt = None,
        cache_dir: opt.CacheDirOpt = None,
        no_download: opt.NoDownloadOpt = False,
        metrics_port: Annotated[Optional[int], typer.Option(help="Serve /metrics on this port (0: any).")] = None,  # noqa: UP045
        metrics_host: opt.MetricsHostOpt = "127.0.0.1",
        token_env: opt.TokenEnvOpt = "EDGETRAIN_TOKEN",
        token_file: opt.TokenFileOpt = None,
        tls_ca: Annotated[Optional[Path], typer.Option(help="CA certificate to trust (enables TLS).")] = None,  # noqa: UP045
        tls_cert: Annotated[Optional[Path], typer.Option(help="Client certificate (mutual TLS).")] = None,  # noqa: UP045
        tls_key: Annotated[Optional[Path], typer.Option(help="Client key (mutual TLS).")] = None,  # noqa: UP045
        give_up_after: Annotated[Optional[float], typer.Option(help="Give up if unreachable for N s.")] = None,  # noqa: UP045
        log_level: opt.LogLevelOpt = "info",
    ) -> int:
        """Join a coordinator and train until it says the run is over (SIGINT/SIGTERM leave cleanly)."""
        from .config import AgentConfig
        from .runner import AgentRunner

        setup_logging(log_level)
        core_list, why = resolve_cores(cores)
        if why:
            typer.echo(why)
        n_workers = parse_count(workers, "--workers")
        cfg = AgentConfig(
            coordinator=coordinator, cores=core_list, workers=n_workers or 1, auto_workers=n_workers is None,
            name=socket.gethostname() if name is None else name,  # an empty --name is refused, not the host's
            device=device, where=DataLocation(data_dir, data_path, cache_dir, not no_download, test_path, val_path),
            metrics_host=metrics_host, metrics_port=metrics_port, token=read_token(token_env, token_file),
            tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, give_up_after=give_up_after,
        )
        runner = AgentRunner(cfg, threading.Event(), prefork=True)  # this command ran no torch nor gRPC yet
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: runner.interrupt())
        code = runner.run()
        if code != 0 and runner.failure:
            raise EdgetrainError(runner.failure)  # run_app prints it as the one error line and exits 1
        return code

    return app


main = entry(make_app, "edge-agent")

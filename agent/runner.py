"""The agent's life: join, start pinned workers, train round after round, leave cleanly."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry

from edgetrain import serde
from edgetrain.cli_util import read_file
from edgetrain.compression import ErrorFeedback
from edgetrain.cores import format_cores, pin_current_process
from edgetrain.errors import ConfigError
from edgetrain.httpmetrics import MetricsServer
from edgetrain.procs import Prestarted, may_fork
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.records import NodeStats
from edgetrain.spec import RunSpec

from .client import CoordinatorClient, TLSFiles, backoff_delays, poll_again_delay
from .config import AgentConfig
from .metrics import AgentMetrics
from .route import Round, Route, UpdateFile
from .worker import WeightsFileError, WorkerPool

log = logging.getLogger("edgetrain.agent")

# Errors after which the agent joins again (the coordinator restarted, or replaced this session).
_REJOIN = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)
# Errors worth waiting out: the coordinator is restarting or the link dropped, or it is busy (RESOURCE_EXHAUSTED:
# a limit of coordinator/admission.py, e.g. this agent's open calls, cleared once they end). DEADLINE_EXCEEDED is
# here on purpose: GetRound is an idempotent long-poll read (the server answers WAIT well inside its deadline, so a
# timeout means a stalled link or a slow weights download), and asking again is safe. An update is never sent
# twice as such: after a failed SubmitUpdate the agent asks for work again, and trains the round again only
# if the coordinator did not take the first copy (a second copy that lands is refused ALREADY_EXISTS).
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
_DETAIL_MAX = 1000  # a FAILED header's reason is input: one bounded line in the agent's error


def _read(path: Path | None, what: str) -> bytes | None:
    return None if path is None else read_file(path, what)


class _Outage:
    """How long the coordinator has been unreachable, and the back-off between tries meanwhile."""

    def __init__(self) -> None:
        self.over()

    def over(self) -> None:
        """An answer came: the next failure starts a new outage."""
        self.since = 0.0
        self.delays: Iterator[float] | None = None

    def next_delay(self, give_up_after: float | None) -> float | None:
        """Seconds to wait before trying again; None once the outage has lasted longer than `give_up_after`."""
        self.since = self.since or time.monotonic()
        if give_up_after is not None and time.monotonic() - self.since > give_up_after:
            return None
        self.delays = self.delays or backoff_delays()
        return next(self.delays)


class AgentRunner:
    """Runs until the coordinator says FINISHED or FAILED, or `stop` is set. `run()` returns a process exit code.

    When it returns 1 because the coordinator is gone, refused the agent or failed the run, `failure` says so in
    one line; the runner does not log it, so that the CLI's `edge-agent: error:` line is the only one.
    """

    def __init__(self, cfg: AgentConfig, stop: threading.Event | None = None,
                 registry: CollectorRegistry | None = None, *, prefork: bool = False) -> None:
        """`prefork`: the caller ran neither gRPC nor torch in this process (the command), so workers may be forked.

        They are forked at once, while the agent joins (procs.Prestarted); a process that did, such as a test's,
        spawns them once the run is known.
        """
        self.cfg = cfg
        self.prefork = prefork
        self._prestarted: Prestarted | None = None
        self.stop = stop or threading.Event()
        self.registry = registry or CollectorRegistry()
        self.pool: WorkerPool | None = None
        self.metrics_server: MetricsServer | None = None
        self.rounds_trained = 0
        self.ready = threading.Event()  # set once workers are up (tests wait on it)
        self._client_ref: CoordinatorClient | None = None
        self.failure: str | None = None  # why run() returned 1, in one line (the CLI prints it)
        self._split_for: RunSpec | None = None  # the run whose split --workers auto has chosen

    def interrupt(self) -> None:
        """Stop soon and leave cleanly (safe to call from a signal handler)."""
        self.stop.set()
        if self._client_ref is not None:
            self._client_ref.cancel()

    def _client(self) -> CoordinatorClient:
        tls = None
        if self.cfg.tls_ca or self.cfg.tls_cert:
            tls = TLSFiles(_read(self.cfg.tls_ca, "CA certificate"), _read(self.cfg.tls_cert, "client certificate"),
                           _read(self.cfg.tls_key, "client key"))
        return CoordinatorClient(self.cfg.coordinator, token=self.cfg.token, tls=tls)

    def _join_request(self) -> pb.JoinRequest:
        addr = self.metrics_server.address if self.metrics_server else ""
        return pb.JoinRequest(agent_name=self.cfg.name, cores=self.cfg.cores, device=self.cfg.device,
                              throughput=self.cfg.throughput, workers=self.cfg.workers, metrics_address=addr)

    def run(self) -> int:
        cfg = self.cfg
        pin_current_process(cfg.cores)
        # The agent's own tensor work is decoding weights and copying them to its workers' shared memory. Its
        # cores belong to the workers, and torch's default pool (one thread per core of the machine) spins at
        # every OpenMP barrier while the other threads wait for a core: measured on a 1-core agent, decoding
        # the MNIST CNN's weights took ~40 ms with 2 threads and ~3 ms with one. One thread, always.
        torch.set_num_threads(1)
        if cfg.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {cfg.device} requested, but torch sees no CUDA device here")
        if self.prefork and cfg.device == "cpu" and not cfg.auto_workers and may_fork():
            self._prestarted = Prestarted(len(cfg.core_groups), name="edge-worker")  # before any thread starts
        try:
            metrics = AgentMetrics(self.registry, name=cfg.name, cores=cfg.cores, device=cfg.device,
                                   workers=cfg.workers, pids=lambda: self.pool.pids if self.pool else [])
            if cfg.metrics_port is not None:
                self.metrics_server = MetricsServer(self.registry, cfg.metrics_host, cfg.metrics_port)
            client = self._client()
        except BaseException:  # a busy --metrics-port, an unreadable certificate: the workers must not outlive it
            self._stop_prestarted()
            raise
        self._client_ref = client
        spec: RunSpec | None = None
        try:
            while not self.stop.is_set():
                reply = client.join(self._join_request(), self.stop, cfg.give_up_after)
                new_spec = RunSpec.from_proto(reply.spec)
                if cfg.auto_workers and new_spec != self._split_for and self._choose_workers(client, new_spec):
                    cfg = self.cfg
                    metrics.set_workers(cfg.workers)
                    continue  # join again with the chosen number of workers
                if new_spec != spec:
                    if self.pool is not None:
                        self.pool.stop()
                    spec = new_spec
                    log.info("joined as %s; starting %d worker(s) on cores %s", reply.agent_id, cfg.workers,
                             cfg.core_groups)
                    prestarted, self._prestarted = self._prestarted, None  # for the first pool only
                    self.pool = WorkerPool(cfg.core_groups, spec, cfg.where, cfg.device, prestarted=prestarted)
                    self.ready.set()
                else:
                    log.info("joined again as %s (same run: workers kept)", reply.agent_id)
                ended = self._train(client, spec, metrics)
                if ended == "failed":
                    return 1
                if ended == "finished":
                    return 0
            return 0
        except grpc.RpcError as err:
            if self.stop.is_set():
                return 0
            self.failure = self._failure(err)
            return 1
        finally:
            client.leave()
            client.close()
            if self.pool is not None:
                self.pool.stop()
            self._stop_prestarted()
            if self.metrics_server is not None:
                self.metrics_server.close()

    def _stop_prestarted(self) -> None:
        """End forked workers that no pool took over (they see EOF and exit)."""
        if self._prestarted is not None:
            self._prestarted.stop()
            self._prestarted = None

    def _choose_workers(self, client: CoordinatorClient, spec: RunSpec) -> bool:
        """--workers auto: the split of this run's model on these cores, cached or measured (edgetrain.split).

        The coordinator sizes an agent's work by the workers it joined with, and a probe takes a while: so the agent
        leaves before probing, and returns True when it must join again (with the chosen count).
        """
        from rich.console import Console

        from edgetrain.split import choose_split, split_table

        self._split_for = spec
        console = Console(stderr=True)
        left = []

        def leave_first() -> None:
            client.leave()
            left.append(True)
            console.print(f"--workers auto: measuring the splits of cores {format_cores(self.cfg.cores)} "
                          f"(out of the rounds meanwhile)")

        split = choose_split(spec, self.cfg.where, self.cfg.cores, mode="ddp", cache_dir=self.cfg.where.cache_dir,
                             before_probe=leave_first)
        console.print(split_table(split))
        changed = split.processes != self.cfg.workers
        self.cfg = replace(self.cfg, workers=split.processes)
        return bool(left) or changed

    def _failure(self, err: grpc.RpcError) -> str:
        """One line for the RPC error that ended the run: gave up retrying, or a real refusal."""
        details = " ".join((err.details() or "").split())  # gRPC's details may span lines
        if err.code() in _RETRY:
            gave_up = (f"; gave up (--give-up-after {self.cfg.give_up_after:g} s)" if self.cfg.give_up_after is not None
                       else "")
            return f"coordinator {self.cfg.coordinator} unreachable{gave_up}: {err.code().name} {details}".rstrip()
        return f"coordinator refused: {err.code().name} {details}".rstrip()

    def _train(self, client: CoordinatorClient, spec: RunSpec, metrics: AgentMetrics) -> str:
        """Train rounds until FINISHED ("finished"), FAILED ("failed"), stop, or the session is gone ("rejoin")."""
        assert self.pool is not None
        expected = serde.spec_of(self.pool.shared)
        feedback = ErrorFeedback(spec.update_dtype)  # compressed updates travel as deltas with error feedback
        after = -1
        # An update's upload can only be timed once it has been sent, and the wire message has no separate upload
        # figure: so each update reports this round's download plus this node's previous upload (of the last update
        # the coordinator took; 0 for the first since joining). The upload part lags one update behind.
        upload_seconds = 0.0
        outage = _Outage()
        route = Route(client)
        while not self.stop.is_set():
            # A single CPU worker reads the weights file and writes the update file itself (same host)
            direct = self.pool.reads_files and not feedback.active and not feedback.pending
            rnd = self._fetch(route, after, expected, direct, outage)
            if isinstance(rnd, str):
                return rnd  # "rejoin"
            if rnd is None:
                continue
            header = rnd.header
            if header.status in (pb.FINISHED, pb.FAILED):
                return self._ended(header)
            if header.status != pb.WORK:  # WAIT: ask again, at once or when the coordinator asked us to
                self.stop.wait(poll_again_delay(header))
                continue
            try:
                result, step_times, written = self.pool.train(rnd.state, route.task(rnd, direct))
            except WeightsFileError as err:
                route.stream_from_now(f"the worker cannot read the weights file ({err})")
                continue  # the same round again, streamed
            stats = NodeStats(
                samples=result.samples,
                compute_seconds=result.seconds,
                communication_seconds=rnd.download_seconds + upload_seconds,  # see above
                loss=result.loss,
                accuracy=result.accuracy,
                samples_per_second=result.samples / result.seconds if result.seconds > 0 else 0.0,
            )
            # The round's dtype (the coordinator's auto choice) or the run's; anything but float32, and float32 while
            # residuals are left, goes as a delta, which needs the round's weights here: an update written straight
            # to a same-host file (no link to spare) goes as float32 weights.
            wire = feedback.wire_for(header.update_dtype)
            if header.update_dtype not in ("", feedback.wire_dtype) and route.same_host and header.update_file:
                wire = "float32"  # asked for a link's sake, but this update stays on this host
            as_delta = rnd.state is not None and (wire != "float32" or feedback.pending)
            if as_delta:
                assert rnd.state is not None
                update = feedback.delta(self.pool.shared, rnd.state, wire)
            else:
                wire, update = "float32", self.pool.shared
            # a worker that could not write the update file left the trained weights in the shared tensors
            sent = self._submit(route, header, stats, update, wire, delta=as_delta, written=written)
            if sent == "rejoin":
                return "rejoin"
            if sent == "again":
                continue
            if not isinstance(sent, str):  # taken (its upload seconds): a refusal comes as a status (UpdateAck)
                upload_seconds = sent
                metrics.round_done(result.samples, step_times)
                self.rounds_trained += 1
            after = header.round
        return "finished"

    def _submit(self, route: Route, header: pb.RoundHeader, stats: NodeStats, update: dict[str, torch.Tensor],
                dtype: str, *, delta: bool, written: UpdateFile | None) -> float | str:
        """Send a trained round's update.

        Returns its upload's seconds once taken; else "refused" (go on with the next round), "again" (not
        confirmed: ask for work again) or "rejoin" (the session is gone).
        """
        try:
            _, upload_seconds, _ = route.send(header.round, stats, update, dtype, delta=delta,
                                              update_file=header.update_file, written=written,
                                              round_deadline=header.deadline_unix)
        except grpc.RpcError as err:
            if err.code() in _REJOIN:
                return "rejoin"
            if err.code() in _RETRY:
                log.warning("update for round %d not confirmed (%s); asking for work again", header.round,
                            err.code().name)
                self.stop.wait(0.5)
                return "again"
            # refused (late, stale, ...): the coordinator says why
            log.warning("update for round %d refused: %s %s", header.round, err.code().name, err.details())
            return "refused"
        return upload_seconds

    def _fetch(self, route: Route, after: int, expected: dict[str, serde.TensorSpec], direct: bool,
               outage: _Outage) -> Round | str | None:
        """The round after `after`; "rejoin" when the session is gone; None to ask again or when stopping.

        While the coordinator is unreachable it waits a back-off delay before returning None, and raises once it
        has been gone longer than --give-up-after.
        """
        try:
            rnd = route.fetch(after, expected, read_file=not direct)
        except grpc.RpcError as err:
            if self.stop.is_set():
                return None
            if err.code() in _REJOIN:
                return "rejoin"
            if err.code() not in _RETRY:
                raise
            delay = outage.next_delay(self.cfg.give_up_after)
            if delay is None:
                raise  # the coordinator has been gone longer than we agreed to wait
            self.stop.wait(delay)
            return None
        outage.over()
        return rnd

    def _ended(self, header: pb.RoundHeader) -> str:
        """The coordinator's last word: FINISHED ("finished") or FAILED ("failed", its reason in `failure`)."""
        if header.status == pb.FINISHED:
            return "finished"
        # never heard as finished: the CLI exits 1 with this line
        detail = " ".join(header.detail.split())[:_DETAIL_MAX] or "no reason given"
        self.failure = f"the coordinator stopped the run on an error: {detail}"
        return "failed"

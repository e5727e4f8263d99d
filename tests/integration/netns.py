"""Emulated hosts for tests and benchmarks: each host its own Linux network namespace, all plugged into one bridge.

    with Cluster(["coord", "a", "b"]) as net:
        net.address("coord")                 # "10.x.y.1": an address inside the cluster
        net.wrap("a")                        # ["ip", "netns", "exec", NS]: put it before a command to run it on a
        net.shape("a", rate_bits=20e6)       # tc tbf on a's link, both ways
        net.lose("a", 0.1)                   # iptables statistic: each packet to or from a lost with p = 0.1
        net.partition("a"); net.heal("a")    # a's packets silently dropped (no RST), then not
        net.relay("coord", port, delay_s=0.02, jitter_s=0.01)  # delay and jitter (the kernel has no netem)
        net.established("a", "coord")        # a's TCP connections to coord that the kernel holds open

Every byte between hosts crosses the kernel's TCP stack and a veth pair, as between machines. What it makes:
a switch namespace holding a bridge `br0`, and per host a namespace whose `eth0` (one end of a veth pair; the
other end is a port of the bridge) has 10.X.Y.<n>/24, a subnet drawn from the test process's pid so that runs
side by side on one machine differ (the namespaces alone would keep them apart). Nothing outside these
namespaces is touched: the shaping, loss and partitions are qdiscs and iptables rules inside them, and
`close` deletes the namespaces, which takes their interfaces, qdiscs and rules along. Processes started in a
namespace must be ended before (the `cluster` fixture does both, in that order, even when a test fails).

Loss and partitions are iptables rules on INPUT only, at both ends of the link: a packet dropped there was sent
and is silently gone, as on a wire. A DROP on OUTPUT is a local send error the sender's own stack sees (a UDP
send fails EPERM; TCP's own send path handles it), not a packet lost between hosts.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

from tests.integration.relay import Relay

CLONE_NEWNET = 0x40000000  # <sched.h>: setns(2) into a network namespace
_count = itertools.count()
_probed: list[str | None] = []  # why namespaces cannot be used here (None: they can), once per process


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why this machine cannot run the harness (None: it can): needs root, ip, tc, iptables and netns."""
    if not _probed:
        _probed.append(_probe())
    return _probed[0]


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc", "iptables", "ss") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian: apt-get install iproute2 iptables)"
    probe = f"et{os.getpid()}-probe"
    try:
        _run("ip", "netns", "add", probe)
        try:
            _run("ip", "netns", "exec", probe, "iptables", "-w", "-A", "INPUT", "-m", "statistic", "--mode",
                 "random", "--probability", "0.5", "-j", "DROP")
        finally:
            _run("ip", "netns", "del", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        return f"cannot make a network namespace with an iptables rule here: {err}"
    return None


def _subnet() -> str:
    """A /24 in 10.64.0.0/10 drawn from the pid and a counter: "10.X.Y" (clusters side by side differ)."""
    n = (os.getpid() * 16 + next(_count)) % (64 * 256)
    return f"10.{64 + n // 256}.{n % 256}"


def _host(address: str) -> str:
    """The IPv4 host of ss's "10.1.2.3:80" or "[::ffff:10.1.2.3]:80"."""
    return address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread in network namespace `ns` (with the sockets it makes and the threads it starts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # a thread left in a test namespace would be worse than a crash
                raise OSError(ctypes.get_errno(), "setns back to the test's own namespace failed")
    finally:
        os.close(own)


class Cluster:
    """Hosts in their own network namespaces on one bridge; see the module's docstring."""

    def __init__(self, hosts: Sequence[str]) -> None:
        tag = f"et{os.getpid()}-{next(_count)}"
        net = _subnet()
        self.switch = f"{tag}-sw"
        self.ns = {host: f"{tag}-{host}" for host in hosts}
        self.addresses = {host: f"{net}.{i + 1}" for i, host in enumerate(hosts)}
        self._ports = {host: f"p{i}" for i, host in enumerate(hosts)}  # the host's bridge port, in the switch
        self._rules: list[tuple[str, str, list[str]]] = []  # (host, namespace, iptables rule) added for a host
        self._relays: list[Relay] = []
        try:
            _run("ip", "netns", "add", self.switch)
            self._ip(self.switch, "link", "add", "br0", "type", "bridge")
            self._ip(self.switch, "link", "set", "br0", "up")
            for host, ns in self.ns.items():
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", self._ports[host],
                     "netns", self.switch)
                self._ip(self.switch, "link", "set", self._ports[host], "master", "br0", "up")
                self._ip(ns, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
                self._ip(ns, "link", "set", "eth0", "up")
                self._ip(ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the relays and delete every namespace made (their links, qdiscs and rules go with them)."""
        for relay in self._relays:
            relay.close()
        self._relays.clear()
        for ns in [*self.ns.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # absent: nothing to do

    def address(self, host: str) -> str:
        return self.addresses[host]

    def wrap(self, host: str) -> list[str]:
        """The command prefix that runs a command on `host`."""
        return ["ip", "netns", "exec", self.ns[host]]

    # ------------------------------------------------------------------------------------------------ links

    def shape(self, host: str, rate_bits: float) -> None:
        """Cap `host`'s link at `rate_bits` bit/s each way (tc tbf on both ends of its veth pair)."""
        rate_bytes = rate_bits / 8
        burst = max(64 * 1024, int(rate_bytes / 250))  # a 64 KiB segment (veth sends GSO), or 4 ms at the rate
        for ns, dev in ((self.ns[host], "eth0"), (self.switch, self._ports[host])):
            self._tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(rate_bits)}bit", "burst",
                     str(burst), "latency", "100ms")

    def lose(self, host: str, probability: float) -> None:
        """Drop each packet to or from `host` with `probability`, at random (iptables statistic)."""
        self._filter(host, ["-m", "statistic", "--mode", "random", "--probability", f"{probability}", "-j", "DROP"])

    def partition(self, host: str) -> None:
        """Drop every packet to or from `host`: its peers and it hear nothing, and nobody is told (no RST)."""
        self._filter(host, ["-j", "DROP"])

    def heal(self, host: str | None = None) -> None:
        """Take back the loss and partition rules on `host`'s link (every link's when None)."""
        for owner, ns, spec in [r for r in self._rules if host in (None, r[0])]:
            self._iptables(ns, "-D", *spec)
            self._rules.remove((owner, ns, spec))

    def _filter(self, host: str, verdict: list[str]) -> None:
        """Add `verdict` for packets arriving at `host` on its link, and for packets from it at every other host."""
        rules = [(self.ns[host], ["INPUT", "-i", "eth0", *verdict])]
        rules += [(ns, ["INPUT", "-i", "eth0", "-s", f"{self.addresses[host]}/32", *verdict])
                  for other, ns in self.ns.items() if other != host]
        for ns, spec in rules:
            self._iptables(ns, "-I", *spec)
            self._rules.append((host, ns, spec))

    # ------------------------------------------------------------------------------------------------ in hosts

    def relay(self, host: str, target_port: int, *, down_bytes_per_s: float | None = None, delay_s: float = 0.0,
              jitter_s: float = 0.0, seed: int = 0) -> Relay:
        """A Relay on `host`'s address (a free port) to `target_port` there: connect to it to cross a slow link."""
        with inside(self.ns[host]):
            relay = Relay(target_port, down_bytes_per_s, delay_s=delay_s, jitter_s=jitter_s, seed=seed,
                          host=self.addresses[host], target_host=self.addresses[host])
        self._relays.append(relay)
        return relay

    def established(self, host: str, peer: str) -> list[str]:
        """`host`'s TCP connections to or from `peer` in state ESTABLISHED, as "local -> remote"."""
        out = _run(*self.wrap(host), "ss", "-Htn", "state", "established")
        conns = []
        for line in out.splitlines():
            fields = line.split()  # Recv-Q Send-Q Local:Port Peer:Port; gRPC's dual-stack sockets show [::ffff:v4]
            if len(fields) >= 4 and _host(fields[3]) == self.addresses[peer]:
                conns.append(f"{_host(fields[2])} -> {_host(fields[3])}")
        return conns

    # ------------------------------------------------------------------------------------------------ commands

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _run("ip", "-n", ns, *args)

    @staticmethod
    def _tc(ns: str, *args: str) -> None:
        _run("ip", "netns", "exec", ns, "tc", *args)

    @staticmethod
    def _iptables(ns: str, *args: str) -> None:
        _run("ip", "netns", "exec", ns, "iptables", "-w", *args)

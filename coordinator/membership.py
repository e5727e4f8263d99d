"""Who takes part: agents admitted by name, each with an id and a session token."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from edgetrain.errors import EdgetrainError


class FullError(EdgetrainError):
    """As many agents as the run admits are in already."""


@dataclass
class Agent:
    """One admitted agent. A restart under the same name replaces the old record (new id and token)."""

    agent_id: str
    name: str
    session_token: str
    cores: tuple[int, ...] = ()
    device: str = "cpu"
    workers: int = 1
    throughput: float = 0.0  # samples/s: what it declared, then what it measured in rounds
    metrics_address: str = ""
    joined_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    order: int = 0  # admission order: ranks follow it
    ready: bool = False  # set at its first GetRound: data loaded, workers up; only ready agents get rounds
    polled: bool = False  # it has asked for a round at least once (an agent that never does is evicted)
    local: bool = False  # it joined from a loopback address: this host, no link (the auto rule leaves it out)


class Membership:
    """Thread-safe registry of live agents.

    `on_leave(agent)` runs when an agent is removed (it left, or was forgotten), under the registry's lock, so
    no admission under its name comes between (it must not call back into the registry). An agent replaced by a
    restart under its name does not leave: the new record takes its place.
    """

    def __init__(self, on_leave: Callable[[Agent], None] | None = None, max_agents: int | None = None) -> None:
        self._on_leave = on_leave
        self.max_agents = max_agents
        self._lock = threading.Lock()
        self._by_id: dict[str, Agent] = {}
        self._by_name: dict[str, str] = {}
        self._by_session: dict[str, str] = {}
        self._counter = 0

    def admit(self, name: str, **info: object) -> tuple[Agent, Agent | None]:
        """Admit `name`; returns (new record, replaced record or None). FullError past `max_agents` new names."""
        with self._lock:
            if (self.max_agents is not None and name not in self._by_name
                    and len(self._by_id) >= self.max_agents):
                raise FullError(f"{self.max_agents} agents are in already")
            old_id = self._by_name.pop(name, None)
            old = self._by_id.pop(old_id, None) if old_id else None
            self._counter += 1
            agent = Agent(
                agent_id=secrets.token_hex(8),
                name=name,
                session_token=secrets.token_urlsafe(24),
                order=self._counter,
            )
            for key, value in info.items():
                setattr(agent, key, value)
            if old is not None:
                self._by_session.pop(old.session_token, None)
            self._by_id[agent.agent_id] = agent
            self._by_name[name] = agent.agent_id
            self._by_session[agent.session_token] = agent.agent_id
            return agent, old

    def get(self, agent_id: str) -> Agent | None:
        with self._lock:
            return self._by_id.get(agent_id)

    def by_session(self, token: str) -> Agent | None:
        """The agent whose current session token is `token` (a dict lookup: checked before anything blocks)."""
        with self._lock:
            agent_id = self._by_session.get(token)
            return None if agent_id is None else self._by_id.get(agent_id)

    def check_session(self, agent_id: str, token: str) -> Agent | None:
        """The agent if `token` is its current session token (constant-time compare), else None."""
        with self._lock:
            agent = self._by_id.get(agent_id)
        if agent is None or not secrets.compare_digest(agent.session_token, token):
            return None
        agent.last_seen = time.monotonic()
        return agent

    def remove(self, agent_id: str) -> Agent | None:
        with self._lock:
            agent = self._by_id.pop(agent_id, None)
            if agent is None:
                return None
            if self._by_name.get(agent.name) == agent_id:
                del self._by_name[agent.name]
            self._by_session.pop(agent.session_token, None)
            if self._on_leave is not None:
                self._on_leave(agent)
        return agent

    def sweep(self, *, first_poll: float, idle: float, busy: Collection[str],
              open_calls: Callable[[str], int], now: float | None = None) -> list[Agent]:
        """Evict agents gone quiet; returns them.

        Gone quiet: it never asked for a round within `first_poll` s of joining, or it is not `busy` (in the
        open round, its update not in), has no call open and was unseen for `idle` s.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            agents = list(self._by_id.values())
        gone = [a for a in agents if (not a.polled and now - a.joined_at > first_poll) or (
            a.polled and a.agent_id not in busy and now - a.last_seen > idle and open_calls(a.agent_id) == 0)]
        return [a for a in gone if self.remove(a.agent_id) is not None]

    def live(self, ready_only: bool = False) -> list[Agent]:
        """Live agents in admission order (only those ready to train, if asked)."""
        with self._lock:
            agents = sorted(self._by_id.values(), key=lambda a: a.order)
        return [a for a in agents if a.ready] if ready_only else agents

    def ready_count(self) -> int:
        return len(self.live(ready_only=True))

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

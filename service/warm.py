"""What the live workers have warm (``workers.warmup`` publishes it): for ``/readyz`` and
``GET /v1/models/{id}``.

A worker counts when RQ has it registered (it registers only after its warm-up) and its
warm state (``schemas.keys.warm_key``, renewed every heartbeat) says ``ready``. Workers
still warming up (not registered yet) show in ``warming``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError
from redis import Redis
from rq import Worker

from schemas import keys
from schemas.jobs import WarmState


@dataclass
class Fleet:
    registered: dict[str, int] = field(default_factory=dict)  # queue -> workers registered
    ready: dict[str, int] = field(default_factory=dict)  # queue -> of those, warm and ready
    models: dict[str, dict[str, str]] = field(default_factory=dict)  # model id -> {worker: version}
    warming: dict[str, list[str]] = field(default_factory=dict)  # worker -> models it is warming
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # worker -> {model id: why}

    def warm_workers(self, model_id: str, version: str) -> list[str]:
        return sorted(w for w, v in self.models.get(model_id, {}).items() if v == version)


def fleet(conn: Redis) -> Fleet:
    """The registered workers and the warm states of all (a worker warming up publishes its
    state before it registers). Raises ``RedisError`` when Redis is unreachable."""
    state_keys = list(conn.scan_iter(match=keys.warm_key("*"), count=1000))
    states: dict[str, WarmState] = {}
    for data in conn.mget(state_keys) if state_keys else []:
        try:
            state = WarmState.model_validate_json(data) if data is not None else None
        except ValidationError:
            state = None  # a worker of another version: not counted as warm
        if state is not None:
            states[state.worker] = state
    out = Fleet(registered={q: 0 for q in keys.QUEUES}, ready={q: 0 for q in keys.QUEUES})
    for w in Worker.all(connection=conn):
        state = states.get(w.name)
        for q in w.queue_names():
            if q in out.registered:
                out.registered[q] += 1
                out.ready[q] += bool(state is not None and state.ready)
        if state is not None:
            for model_id, version in state.models.items():
                out.models.setdefault(model_id, {})[w.name] = version
    for state in states.values():
        if state.warming:
            out.warming[state.worker] = state.warming
        if state.failed:
            out.failed[state.worker] = state.failed
    return out

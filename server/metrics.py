"""Prometheus metrics, `crsm_` prefix, one CollectorRegistry per app (tests run several apps in a process).

Token, latency and injection metrics are recorded when a session ends (from the generator thread;
prometheus-client is thread-safe); request counts and request latency by an ASGI middleware.

`StatusHistory` keeps the last minute of the same counts, sampled once a second, as rates for
`GET /v1/status`. A second in which no plan was resolved has no landing ratio and no lag (None), rather
than a made-up 0. Tokens are counted when their session ends, as `crsm_generated_tokens` is, so the rate
is what `rate(crsm_generated_tokens_total[1m])` shows.

The injection acceptance ratio is not exported as a gauge (a ratio since start says little about now):
it is derived from the counters over a window, `ACCEPTANCE_RATIO_PROMQL`, as the dashboard does
(deploy/grafana/dashboards/crsm.json).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crsm_core.engine import ServingEngine, SessionRecord
from crsm_core.injection import Effect, InjectionEvent, InjectionOutcome

# Decoding is millisecond-scale: fine buckets from 0.5 ms, coarse ones up to whole requests.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Positions from a plan's snapshot to its resolution: its lead (at most MAX_LAG) and its lateness (pruned
# past max_lag: a request's at most MAX_LATENESS, the model's default 64) and one; the buckets reach past them.
LAG_TOKEN_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LAG_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

ACCEPTED = (InjectionOutcome.APPLIED, InjectionOutcome.APPLIED_LATE)
_ACCEPTED_RE = "|".join(o.value for o in ACCEPTED)
ACCEPTANCE_RATIO_PROMQL = (f'sum(rate(crsm_injections_total{{outcome=~"{_ACCEPTED_RE}"}}[5m]))'
                           f' / sum(rate(crsm_injections_total[5m]))')
GENERATION_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/generate"})
# The status recorded for a request whose client left before any response was sent.
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class Totals:
    """The live gauges and the counts since start, at one moment (`StatusHistory` turns them into rates)."""
    running: int
    waiting: int
    generated_tokens: int   # of finished sessions, as crsm_generated_tokens
    resolved: int           # planner results resolved, whatever the outcome
    landed: int             # of them applied, on time or late
    lag_tokens: int         # summed over the resolved results: positions from snapshot to resolution


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("crsm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("crsm_prompt_tokens", "Prompt tokens of finished sessions", registry=r)
        self.generated_tokens = Counter("crsm_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("crsm_time_to_first_token_seconds", "Submission to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("crsm_inter_token_latency_seconds", "Gap between consecutive tokens of a session",
                             buckets=ITL_BUCKETS, registry=r)
        self.request_latency = Histogram("crsm_request_latency_seconds",
                                         "Generation requests, arrival to last byte", buckets=REQUEST_BUCKETS,
                                         registry=r)
        self.running = Gauge("crsm_running_sessions", "Sessions holding a slot (prefilling or decoding)",
                             registry=r)
        self.waiting = Gauge("crsm_waiting_sessions", "Sessions waiting for a slot", registry=r)
        self.planner_tasks = Gauge("crsm_planner_tasks", "Per-session planners alive", registry=r)
        self.injections = Counter("crsm_injections", "Planner results by injection outcome", ["outcome"],
                                  registry=r)
        self.effects = Counter("crsm_injection_effects",
                               "Applied planner results by what they did: suggested (their token was emitted), "
                               "blended (their state was blended in), none (the emitted token was theirs or "
                               "one they did not judge worse)", ["effect"], registry=r)
        self.planner_lag_tokens = Histogram("crsm_planner_lag_tokens",
                                            "Positions between a planner's snapshot and the use of its result",
                                            buckets=LAG_TOKEN_BUCKETS, registry=r)
        self.planner_lag_seconds = Histogram("crsm_planner_lag_seconds",
                                             "Time between a planner's snapshot and the use of its result",
                                             buckets=LAG_SECONDS_BUCKETS, registry=r)
        self.planner_simulations = Counter("crsm_planner_simulations", "MCTS simulations run", registry=r)
        self.planner_errors = Counter("crsm_planner_errors", "Planner searches that failed", registry=r)
        for gauge in (self.running, self.waiting, self.planner_tasks):
            gauge.set(0)
        for outcome in InjectionOutcome:
            self.injections.labels(outcome.value)
        for effect in Effect:
            self.effects.labels(effect.value)
        self._lock = threading.Lock()
        self._resolved = self._accepted = self._generated = self._lag_tokens = 0
        self._engine: ServingEngine | None = None

    def bind(self, engine: ServingEngine) -> None:
        """Read the live gauges from the engine at scrape time."""
        self._engine = engine
        self.running.set_function(lambda: engine.num_active)
        self.waiting.set_function(lambda: engine.num_waiting)
        self.planner_tasks.set_function(lambda: engine.num_planners)

    def injection(self, event: InjectionEvent) -> None:
        """Every planner result, when the generator (or the session's close) resolves it."""
        self.injections.labels(event.outcome.value).inc()
        if event.effect is not None:
            self.effects.labels(event.effect.value).inc()
        lag = event.position - event.captured_position
        with self._lock:
            self._resolved += 1
            self._accepted += event.outcome in ACCEPTED
            self._lag_tokens += lag
        self.planner_lag_tokens.observe(lag)
        self.planner_lag_seconds.observe(event.latency_s)

    def planner_error(self) -> None:
        """A planner call in the generator failed (the session went on without its planner)."""
        self.planner_errors.inc()

    def session_ended(self, record: SessionRecord) -> None:
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generated_tokens.inc(record.completion_tokens)
        with self._lock:
            self._generated += record.completion_tokens
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)
        for gap in record.inter_token_s:
            self.itl.observe(gap)
        self.planner_errors.inc(record.planner_failures)
        self.planner_simulations.inc(record.simulations)

    def totals(self) -> Totals:
        engine = self._engine
        with self._lock:
            return Totals(running=0 if engine is None else engine.num_active,
                          waiting=0 if engine is None else engine.num_waiting,
                          generated_tokens=self._generated, resolved=self._resolved, landed=self._accepted,
                          lag_tokens=self._lag_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


WINDOW_S = 60
INTERVAL_S = 1.0


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


class StatusHistory:
    """Samples (monotonic time, totals), the newest `window_s / interval_s + 1` of them."""

    def __init__(self, window_s: float = WINDOW_S, interval_s: float = INTERVAL_S):
        self.window_s, self.interval_s = window_s, interval_s
        self._samples: deque[tuple[float, Totals]] = deque(maxlen=round(window_s / interval_s) + 1)

    def record(self, now: float, totals: Totals) -> None:
        self._samples.append((now, totals))

    async def sample_forever(self, metrics: ServerMetrics) -> None:
        while True:
            self.record(time.monotonic(), metrics.totals())
            await asyncio.sleep(self.interval_s)

    def report(self, now: Totals) -> dict:
        """The current gauges, one point per sampled interval (oldest first; `age_s`: seconds before the
        newest sample), and the same rates over the whole window."""
        samples = list(self._samples)
        points = []
        for (t0, a), (t1, b) in zip(samples, samples[1:]):
            points.append(_rates(t1 - t0, a, b) | {"age_s": round(samples[-1][0] - t1, 3),
                                                    "running": b.running, "waiting": b.waiting})
        window = _rates(samples[-1][0] - samples[0][0], samples[0][1], samples[-1][1]) if len(samples) > 1 else None
        return {"interval_s": self.interval_s, "window_s": self.window_s,
                "now": {"running": now.running, "waiting": now.waiting},
                "totals": {"generated_tokens": now.generated_tokens, "resolved_plans": now.resolved,
                           "landed_plans": now.landed},
                "window": window,
                "series": points}


def _rates(seconds: float, a: Totals, b: Totals) -> dict:
    resolved = b.resolved - a.resolved
    return {"seconds": round(seconds, 3),
            "tokens_per_s": _ratio(b.generated_tokens - a.generated_tokens, seconds),
            "resolved_plans": resolved,
            "landing_ratio": _ratio(b.landed - a.landed, resolved),
            "planner_lag_tokens": _ratio(b.lag_tokens - a.lag_tokens, resolved)}


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template and status; times generation requests to the last byte."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            status = status or 500  # the outer error middleware answers 500
            raise
        finally:
            endpoint = _endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status or CLIENT_CLOSED)).inc()
            if endpoint in GENERATION_ENDPOINTS:
                self.metrics.request_latency.observe(time.perf_counter() - start)


def _endpoint(scope: Scope) -> str:
    """The route template of a request: FastAPI names it (scope["route"]) for the API routes it ran; the
    schema, the docs and mounted files are found among the app's own routes. A request the door refused
    before routing (a 413, a 408) is "unmatched": FastAPI's included routers are routes without a path
    of their own, so they are not searched."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in scope["app"].router.routes
                      if isinstance(r, (Route, Mount)) and r.matches(scope)[0] is Match.FULL), None)
    return route.path if route is not None else "unmatched"

"""A small Prometheus registry (counters, gauges, histograms) and the server's metric set.

Text exposition format 0.0.4: ``# HELP`` / ``# TYPE`` lines, then one sample per label set;
histograms expose cumulative ``_bucket{le=...}``, ``_sum`` and ``_count``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

from radixrt.engine.outputs import FORWARD_PATHS, forward_steps_key
from radixrt.server.messages import StatsMsg

Labels = tuple[tuple[str, str], ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        assert name.replace("_", "").isalnum(), f"invalid metric name {name!r}"
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)

    def _key(self, labels: dict[str, str]) -> Labels:
        assert set(labels) == set(self.label_names), (
            f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple((k, str(labels[k])) for k in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        assert name.endswith("_total"), "counter names end in _total"
        super().__init__(name, help_text, label_names)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        assert amount >= 0, "counters only go up"
        k = self._key(labels)
        self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}"
                                for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[Labels, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}"
                                for k, v in sorted(self._values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float],
                 label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        b = sorted(float(x) for x in buckets)
        assert b and all(math.isfinite(x) for x in b), "buckets must be finite upper bounds"
        self.bounds = b
        # per label set: per-bucket (non-cumulative) counts + the +Inf overflow, sum, count
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        counts = self._counts.setdefault(k, [0] * (len(self.bounds) + 1))
        counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self._sums[k] = self._sums.get(k, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), []))

    def render(self) -> list[str]:
        out = self.header()
        for k in sorted(self._counts):
            cum = 0
            for bound, c in zip([*self.bounds, math.inf], self._counts[k]):
                cum += c
                out.append(f"{self.name}_bucket{_fmt_labels(k, (('le', _fmt_value(bound)),))}"
                           f" {cum}")
            out.append(f"{self.name}_sum{_fmt_labels(k)} {_fmt_value(self._sums[k])}")
            out.append(f"{self.name}_count{_fmt_labels(k)} {cum}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, m: _Metric) -> None:
        assert m.name not in self._metrics, f"metric {m.name} registered twice"
        self._metrics[m.name] = m

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """The server's metrics; engine gauges are refreshed from worker stats at scrape time."""

    def __init__(self) -> None:
        self.registry = r = Registry()
        p = "radixrt_"
        self.requests = Counter(p + "requests_total", "HTTP generation requests by endpoint "
                                "and outcome.", ("endpoint", "status"))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated.")
        self.cached_tokens = Counter(p + "cached_tokens_total",
                                     "Prompt tokens served from the prefix cache.")
        self.cache_hit_rate = Gauge(p + "cache_hit_rate",
                                    "Prefix-cache hit rate (hit / queried prompt tokens).",
                                    ("worker",))
        self.kv_pages = Gauge(p + "kv_pages", "KV cache pages by state (used = locked + "
                              "private).", ("worker", "state"))
        self.running = Gauge(p + "running_requests", "Requests running in the engine.",
                             ("worker",))
        self.queued = Gauge(p + "queued_requests", "Requests waiting in the engine queue.",
                            ("worker",))
        self.worker_up = Gauge(p + "worker_up", "1 while the worker answers pings.", ("worker",))
        self.router_waiting = Gauge(p + "router_waiting_requests", "Engine requests the router "
                                    "submitted that have no first token yet (what "
                                    "--max-queued-requests bounds).")
        self.router_in_flight = Gauge(p + "router_in_flight_requests",
                                      "Engine requests the router has submitted and not "
                                      "finished.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.",
                              _LATENCY_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds",
                             "Time between output tokens of one sequence.", _LATENCY_BUCKETS)
        self.e2e = Histogram(p + "e2e_request_latency_seconds",
                             "Request latency from arrival to the last token.", _LATENCY_BUCKETS)
        # Host KV tier (only with --host-kv-cache-tokens): pages by state, and the worker's
        # totals since it started (hits served by loads, bytes each way, device time of loads).
        self.host_pages = Gauge(p + "host_kv_pages", "Host KV tier pages by state (host_only: "
                                "the only copy; backup: also on the GPU; loading: being copied "
                                "to the GPU).", ("worker", "state"))
        self.host_hit_tokens = Gauge(p + "host_kv_hit_tokens", "Prompt tokens served by loads "
                                     "from the host tier since the worker started.", ("worker",))
        self.host_bytes = Gauge(p + "host_kv_bytes", "Bytes copied between the host tier and "
                                "the GPU since the worker started.", ("worker", "direction"))
        self.host_load_seconds = Gauge(p + "host_kv_load_seconds", "Summed duration of host "
                                       "tier loads since the worker started.", ("worker",))
        self.forward_steps = Gauge(p + "forward_steps", "Engine steps since the worker started "
                                   "serving, by how the forward ran (decode_graph, "
                                   "piecewise_graph: CUDA graphs; eager).", ("worker", "path"))
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.cached_tokens,
                  self.cache_hit_rate, self.kv_pages, self.running, self.queued, self.worker_up,
                  self.router_waiting, self.router_in_flight, self.ttft, self.itl, self.e2e,
                  self.host_pages, self.host_hit_tokens, self.host_bytes, self.host_load_seconds,
                  self.forward_steps):
            r.register(m)

    def set_router(self, waiting: int, in_flight: int) -> None:
        self.router_waiting.set(waiting)
        self.router_in_flight.set(in_flight)

    def set_worker(self, worker: int, stats: StatsMsg | None, up: bool) -> None:
        w = str(worker)
        self.worker_up.set(1.0 if up else 0.0, worker=w)
        if stats is None:
            return
        self.cache_hit_rate.set(stats.hit_rate, worker=w)
        used = stats.locked_pages + stats.private_pages
        for state, v in (("total", stats.total_pages), ("free", stats.free_pages),
                         ("evictable", stats.evictable_pages), ("used", used),
                         ("locked", stats.locked_pages), ("private", stats.private_pages)):
            self.kv_pages.set(v, worker=w, state=state)
        self.running.set(stats.running_requests, worker=w)
        self.queued.set(stats.queued_requests, worker=w)
        x = stats.extra
        for path in FORWARD_PATHS:
            if (key := forward_steps_key(path)) in x:
                self.forward_steps.set(x[key], worker=w, path=path)
        if "host_total_pages" in x:
            for state in ("total", "free", "only", "backup", "loading"):
                self.host_pages.set(x[f"host_{state}_pages"], worker=w,
                                    state="host_only" if state == "only" else state)
            self.host_hit_tokens.set(x["host_hit_tokens"], worker=w)
            self.host_bytes.set(x["host_bytes_loaded"], worker=w, direction="loaded")
            self.host_bytes.set(x["host_bytes_written"], worker=w, direction="written")
            self.host_load_seconds.set(x["host_load_seconds"], worker=w)

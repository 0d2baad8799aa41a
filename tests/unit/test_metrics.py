"""The Prometheus registry renders valid exposition text with correct values."""

from __future__ import annotations

import pytest

from radixrt.server.messages import StatsMsg
from radixrt.server.metrics import Counter, Gauge, Histogram, Registry, ServerMetrics


def test_counter_gauge_histogram_exposition() -> None:
    reg = Registry()
    c = Counter("x_requests_total", "Requests.", ("status",))
    g = Gauge("x_pages", "Pages.")
    h = Histogram("x_latency_seconds", "Latency.", (0.1, 1.0))
    for mtr in (c, g, h):
        reg.register(mtr)
    c.inc(status="ok")
    c.inc(2, status="ok")
    c.inc(status='we"ird')
    g.set(7)
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = reg.render().splitlines()
    assert "# TYPE x_requests_total counter" in lines
    assert 'x_requests_total{status="ok"} 3' in lines
    assert 'x_requests_total{status="we\\"ird"} 1' in lines
    assert "x_pages 7" in lines
    assert 'x_latency_seconds_bucket{le="0.1"} 2' in lines  # le is inclusive
    assert 'x_latency_seconds_bucket{le="1"} 3' in lines
    assert 'x_latency_seconds_bucket{le="+Inf"} 4' in lines
    assert "x_latency_seconds_count 4" in lines
    assert any(ln.startswith("x_latency_seconds_sum 3.65") for ln in lines)


def test_misuse_is_caught() -> None:
    c = Counter("y_total", "y", ("a",))
    with pytest.raises(AssertionError):
        c.inc(-1, a="1")
    with pytest.raises(AssertionError):
        c.inc(b="1")
    reg = Registry()
    reg.register(c)
    with pytest.raises(AssertionError):
        reg.register(c)


def test_server_metrics_from_worker_stats() -> None:
    sm = ServerMetrics()
    stats = StatsMsg(2, 1, 100, 60, 30, 6, 4, 0, 10, 30, 40, 0, 0, 40, 9)
    sm.set_worker(0, stats, up=True)
    text = sm.registry.render()
    assert 'radixrt_kv_pages{state="used",worker="0"}' not in text  # label order is fixed
    assert 'radixrt_kv_pages{worker="0",state="used"} 10' in text
    assert 'radixrt_cache_hit_rate{worker="0"} 0.75' in text
    assert 'radixrt_running_requests{worker="0"} 2' in text
    assert 'radixrt_worker_up{worker="0"} 1' in text


def test_forward_steps_by_path_from_worker_stats() -> None:
    sm = ServerMetrics()
    extra = {"forward_steps_decode_graph": 120.0, "forward_steps_piecewise_graph": 7.0,
             "forward_steps_eager": 2.0, "overlapped_steps": 50.0}
    sm.set_worker(1, StatsMsg(0, 0, 100, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, extra), up=True)
    text = sm.registry.render()
    assert 'radixrt_forward_steps{worker="1",path="decode_graph"} 120' in text
    assert 'radixrt_forward_steps{worker="1",path="piecewise_graph"} 7' in text
    assert 'radixrt_forward_steps{worker="1",path="eager"} 2' in text


def test_router_gauges() -> None:
    sm = ServerMetrics()
    sm.set_router(waiting=3, in_flight=5)
    text = sm.registry.render()
    assert "radixrt_router_waiting_requests 3" in text
    assert "radixrt_router_in_flight_requests 5" in text

"""bench/chaos.py's accounting: each stream has one outcome, and only the killed worker's 503s
are excused from the 5xx count."""

from __future__ import annotations

from bench.chaos import outcome, summarize

DIED = {"code": 503, "message": "Generation failed: worker 0 died (process 1 killed by signal "
        "SIGKILL); it is being restarted, retry the request"}


def test_outcomes_are_disjoint_and_5xx_from_the_kill_are_told_apart() -> None:
    records = [
        {"kind": "full", "status": 200, "error": None},
        {"kind": "disconnect", "status": 200, "error": None, "left_early": True},
        {"kind": "abort", "status": None, "error": None, "timed_out_client_side": True},
        {"kind": "full", "status": 200, "error": DIED},  # error event inside a 200 stream
        {"kind": "abort", "status": 503, "error": DIED},
        {"kind": "full", "status": 500, "error": {"code": 500, "message": "boom"}},
        {"kind": "hostile", "name": "nan", "status": 400},
        {"kind": "hostile", "name": "deep", "status": 500},
    ]
    assert [outcome(r) for r in records[:6]] == [
        "completed", "left_early_by_client", "left_early_by_client",
        "failed_503_on_killed_worker", "failed_503_on_killed_worker", "failed_other"]
    s = summarize(records)
    assert s["streams"] == 6 and s["completed"] == 1 and s["failed_other"] == 1
    assert s["hostile_sent"] == 2 and s["hostile_4xx"] == 1
    assert s["5xx_total"] == 4 and s["5xx_not_from_the_kill"] == 2

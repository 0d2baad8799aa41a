"""bench/cascade_agreement.py: first divergences classified by the off run's top-2 margin."""

from __future__ import annotations

import pytest

from bench.cascade_agreement import summarize, summary_lines


def _run(ids: list[int], lps: list[float], margins: list[float]) -> dict[str, list]:
    top = [[[t, lp], [t + 1, lp - m]] for t, lp, m in zip(ids, lps, margins)]
    return {"ids": ids, "lp": lps, "top": top}


def test_divergences_are_split_by_margin_and_noise_is_measured_before_them():
    off = {
        "same": _run([1, 2, 3], [-0.5, -0.6, -0.7], [1.0, 1.0, 1.0]),
        "tie": _run([1, 2, 3], [-0.5, -0.6, -0.7], [1.0, 0.01, 1.0]),  # near-tie at step 1
        "real": _run([1, 2, 3], [-0.5, -0.6, -0.7], [0.3, 0.5, 1.0]),  # confident at step 1
    }
    on = {
        "same": _run([1, 2, 3], [-0.501, -0.6, -0.7], [1.0, 1.0, 1.0]),
        "tie": _run([1, 9, 9], [-0.5, -0.6, -0.7], [1.0, 0.01, 1.0]),
        "real": _run([1, 9, 9], [-0.5, -0.6, -0.7], [0.3, 0.5, 1.0]),
    }
    s = summarize(on, off, bound=0.05)
    assert (s["requests"], s["identical"], s["diverged"], s["diverged_at_near_tie"]) == (3, 1, 2, 1)
    assert s["margins_at_divergence"] == pytest.approx([0.01, 0.5])
    # Only steps with the same history count: 3 + 1 + 2 (the tie's step 1 is not confident).
    assert s["confident_steps"] == 6 and s["confident_top1_agreement"] == pytest.approx(5 / 6)
    assert s["noise_logprob_abs_max"] == pytest.approx(0.001)
    text = "\n".join(summary_lines(s))
    assert "near-tie" in text and "in 1 of 2 diverging requests" in text

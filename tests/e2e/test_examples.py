"""The examples run end to end on the default model (short outputs) and their printed cache
numbers hold up: forks reuse the stem, few-shot batches reach the optimal hit rate, RAG hits
with the cache on and not with it off, and chat turns reuse the previous turn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

from tests.e2e.conftest import REPO

PAGE = 16  # the engine's and server's default page size


def run_example(name: str, *args: str, stdin: str | None = None, timeout: float = 240) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], input=stdin,
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    assert p.returncode == 0, f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_fewshot_run_batch_hits_near_optimal() -> None:
    out = run_example("dsl_fewshot.py", "--num-questions", "6")
    f = fields(out.strip().splitlines()[-1])
    hit, optimal = float(f["hit_rate"]), float(f["optimal_hit_rate"])
    assert optimal > 0.5 and hit >= optimal - 0.02, out
    assert "Italy: Rome" in out  # the header works as a few-shot prompt


def test_tree_of_thought_branches_reuse_the_stem() -> None:
    out = run_example("dsl_tree_of_thought.py", "--max-tokens", "8", "--branches", "2")
    stem = int(fields(re.search(r"^stem_tokens=.*$", out, re.M).group(0))["stem_tokens"])  # type: ignore[union-attr]
    branches = [fields(m) for m in re.findall(r"^branch=.*$", out, re.M)]
    assert len(branches) == 2 and stem >= PAGE
    for b in branches:
        assert int(b["cached_tokens"]) >= stem // PAGE * PAGE, out
        assert b["verdict"] in ("yes", "no")
    assert "answer:" in out


def test_tree_of_thought_over_http_needs_no_local_tokenizer(server_factory: Any) -> None:
    server = server_factory(None)  # the default model, as `make run` serves it
    out = run_example("dsl_tree_of_thought.py", "--url", server.url, "--max-tokens", "8",
                      "--branches", "2")
    stem = int(fields(re.search(r"^stem_tokens=.*$", out, re.M).group(0))["stem_tokens"])  # type: ignore[union-attr]
    branches = [fields(m) for m in re.findall(r"^branch=.*$", out, re.M)]
    assert len(branches) == 2 and stem >= PAGE
    for b in branches:
        assert int(b["cached_tokens"]) >= stem // PAGE * PAGE, out
        assert b["verdict"] in ("yes", "no")
    assert "answer:" in out


def test_rag_hits_with_cache_and_not_without() -> None:
    out = run_example("rag.py", "--num-questions", "4", "--max-tokens", "4")
    on = fields(re.search(r"^cache=on .*$", out, re.M).group(0))  # type: ignore[union-attr]
    off = fields(re.search(r"^cache=off .*$", out, re.M).group(0))  # type: ignore[union-attr]
    assert on["prompt_tokens"] == off["prompt_tokens"]
    assert int(off["cached_tokens"]) == 0
    # 4 questions over shared instructions: at least the instructions' pages are reused 3x.
    assert float(on["hit_rate"]) > 0.3, out
    assert "answers_match=True" in out


def test_chatbot_turns_reuse_the_conversation(server_factory: Any) -> None:
    server = server_factory(None)  # the default model
    out = run_example("chatbot.py", "--base-url", server.url + "/v1", "--max-tokens", "8",
                      stdin="Hi! Who are you?\nWhat is a radix tree?\nThanks.\n")
    turns = [fields(m) for m in re.findall(r"^turn=.*$", out, re.M)]
    assert [t["turn"] for t in turns] == ["1", "2", "3"], out
    for prev, cur in zip(turns, turns[1:]):
        # Everything the previous turn sent is a prefix of this turn's prompt.
        assert int(cur["cached_tokens"]) >= int(prev["prompt_tokens"]) // PAGE * PAGE, out

"""Few-shot prompting in the radixrt DSL: one few-shot header shared by many questions, run
with ``run_batch``. The header's pages are computed once and every other question reuses them.

Machine-readable last line:
    hit_rate=0.80 optimal_hit_rate=0.82 cached_tokens=1024 prompt_tokens=1280

    python examples/dsl_fewshot.py [--model PATH | --url http://127.0.0.1:30000]
"""

from __future__ import annotations

import argparse
import time

from _backend import add_backend_args, make_backend

from radixrt.lang import EngineBackend, ProgramState, function, gen
from radixrt.lang.scoring import common_prefix_len

EXAMPLES = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("India", "New Delhi")]
QUESTIONS = ["Italy", "Germany", "Spain", "Brazil", "Mexico", "China", "Greece", "Chile",
             "Sweden", "Poland", "Cuba", "Ireland"]
HEADER = "Give the capital city of each country.\n\n" + "".join(
    f"Country: {c}\nCapital: {a}\n\n" for c, a in EXAMPLES)


@function
def capital(s: ProgramState, country: str) -> None:
    s += HEADER + f"Country: {country}\nCapital:"
    s += gen("capital", max_tokens=6, stop="\n")


def optimal_cached(backend: EngineBackend, prompts: list[str]) -> int:
    """Most tokens a page-granular prefix cache could serve: each prompt after the first
    reuses the full pages it shares with an earlier one."""
    ids = [backend.engine.encode(p) for p in prompts]
    page = backend.engine.config.page_size
    return sum(max(common_prefix_len(p, ids[j]) for j in range(i)) // page * page
               for i, p in enumerate(ids) if i > 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_backend_args(ap)
    ap.add_argument("--num-questions", type=int, default=len(QUESTIONS))
    args = ap.parse_args()
    backend = make_backend(args)
    countries = QUESTIONS[: args.num_questions]
    t0 = time.perf_counter()
    states = capital.run_batch([{"country": c} for c in countries], backend=backend,
                               temperature=0, progress_bar=False)
    elapsed = time.perf_counter() - t0
    for c, st in zip(countries, states):
        print(f"{c}: {st['capital'].strip()}")
    prompt = sum(st.get_meta_info("capital")["prompt_tokens"] for st in states)
    cached = sum(st.get_meta_info("capital")["cached_tokens"] for st in states)
    line = f"hit_rate={cached / prompt:.2f}"
    if isinstance(backend, EngineBackend):
        prompts = [HEADER + f"Country: {c}\nCapital:" for c in countries]
        line += f" optimal_hit_rate={optimal_cached(backend, prompts) / prompt:.2f}"
    print(f"{line} cached_tokens={cached} prompt_tokens={prompt} time_s={elapsed:.2f}")


if __name__ == "__main__":
    main()

"""Tree of thought in the radixrt DSL: fork the conversation into branches, let each propose
an approach (gen), have each branch judge its own approach (select), and answer with the best.

The branches share the conversation so far; fork sends that stem to the prefix cache once, so
every branch's requests reuse its pages. Machine-readable lines:
    stem_tokens=61
    branch=0 prompt_tokens=70 cached_tokens=48 verdict=yes
    cached_tokens=... prompt_tokens=...   (totals over all gen calls)

    python examples/dsl_tree_of_thought.py [--model PATH | --url http://127.0.0.1:30000]
"""

from __future__ import annotations

import argparse

from _backend import add_backend_args, make_backend

from radixrt.lang import ProgramState, assistant, function, gen, select, system, user

STYLES = ["Work it out step by step.", "Use a quick estimate.", "Think of a simpler example."]


@function
def tree_of_thought(s: ProgramState, question: str, num_branches: int, max_tokens: int) -> None:
    s += system("You are a careful problem solver.")
    s += user(question)
    branches = s.fork(num_branches)
    for i, b in enumerate(branches):
        b += assistant([f"Approach {i + 1}: {STYLES[i % len(STYLES)]} ",
                        gen("thought", max_tokens=max_tokens)])
    branches += user("Is this approach correct? Answer yes or no.")
    branches += assistant(select("verdict", choices=["yes", "no"]))
    # Best branch: the one most confident that its approach is right.
    best = max(range(len(branches)), key=lambda i: _confidence(branches[i]))
    s += assistant(branches[best]["thought"])
    s += user("Now give the final answer in one sentence.")
    s += assistant(gen("answer", max_tokens=max_tokens))
    s.set_var("stem_tokens", branches.stem_tokens)
    s.set_var("branches", list(branches))
    s.set_var("best", best)


def _confidence(b: ProgramState) -> float:
    yes, no = b.get_meta_info("verdict")["normalized_prompt_logprobs"]
    return float(yes - no)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_backend_args(ap)
    ap.add_argument("--question", default="A farmer has 17 sheep and all but 9 run away. "
                    "How many sheep are left?")
    ap.add_argument("--branches", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    state = tree_of_thought.run(question=args.question, num_branches=args.branches,
                                max_tokens=args.max_tokens, backend=make_backend(args),
                                temperature=0)
    print(f"stem_tokens={state['stem_tokens']}")
    total_prompt = total_cached = 0
    for i, b in enumerate(state["branches"]):
        m = b.get_meta_info("thought")
        total_prompt += b.usage()["prompt_tokens"]
        total_cached += b.usage()["cached_tokens"]
        print(f"branch={i} prompt_tokens={m['prompt_tokens']} cached_tokens={m['cached_tokens']}"
              f" verdict={b['verdict']}")
        print(f"  thought: {b['thought'].strip()}")
    usage = state.usage()
    total_prompt += usage["prompt_tokens"]
    total_cached += usage["cached_tokens"]
    print(f"best_branch={state['best']}\nanswer: {state['answer'].strip()}")
    print(f"cached_tokens={total_cached} prompt_tokens={total_prompt}")


if __name__ == "__main__":
    main()

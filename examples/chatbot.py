"""A multi-turn terminal chat against a running radixrt server, with the official openai client.

    radixrt serve --port 30000 &            # default model: SmolLM2-135M-Instruct
    python examples/chatbot.py --base-url http://127.0.0.1:30000/v1

Type a message per line; an empty line or EOF ends the chat. After each reply it prints how many
prompt tokens the server took from its prefix cache: every turn resends the whole conversation,
and all of it but the newest message was cached by the previous turn. Machine-readable line:
    turn=2 prompt_tokens=87 cached_tokens=64
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--system", default="You are a helpful, concise assistant.")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}]
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        turn += 1
        messages.append({"role": "user", "content": line})
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens,  # type: ignore[arg-type]
            temperature=0, stream=True, stream_options={"include_usage": True})
        print("bot> ", end="", flush=True)
        reply, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                reply += chunk.choices[0].delta.content
                print(chunk.choices[0].delta.content, end="", flush=True)
            usage = chunk.usage or usage
        print()
        messages.append({"role": "assistant", "content": reply})
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage and \
            usage.prompt_tokens_details else 0
        prompt = usage.prompt_tokens if usage else 0
        print(f"turn={turn} prompt_tokens={prompt} cached_tokens={cached}", flush=True)


if __name__ == "__main__":
    main()

"""`make run`: start the server on the default model, ask it one question, shut it down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

QUESTION = "What is the capital of France?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited during startup (code {proc.returncode})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not healthy after {timeout:.0f}s")


def main() -> int:
    import openai

    port = int(os.environ.get("RADIXRT_DEMO_PORT", 0)) or _free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"starting radixrt server on {url} (default model) ...", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "radixrt.serve", "--port", str(port),
                             "--log-level", "warning"])
    try:
        _wait_healthy(url, proc, timeout=600)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        print(f"model: {model}\nuser: {QUESTION}", flush=True)
        for turn in range(2):  # the second turn shows the prefix cache at work
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}],
                max_tokens=48, temperature=0)
            u = r.usage
            cached = u.prompt_tokens_details.cached_tokens if u and u.prompt_tokens_details \
                else 0
            if turn == 0:
                print(f"assistant: {r.choices[0].message.content}")
            print(f"usage (request {turn + 1}): prompt_tokens={u.prompt_tokens if u else '?'} "
                  f"completion_tokens={u.completion_tokens if u else '?'} "
                  f"cached_tokens={cached}", flush=True)
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""`radixrt serve ...`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from radixrt.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig


def add_serve_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="HF directory or .gguf file (default model "
                    "if omitted)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default=DEFAULT_HOST)
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--api-key", action="append", default=[], dest="api_keys",
                    help="require 'Authorization: Bearer KEY' (repeat for several tenants; "
                    "each key then gets its own cache namespace)")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel worker processes")
    ap.add_argument("--max-queued-requests", type=int, default=4096)
    ap.add_argument("--max-request-tokens", type=int, default=None)
    ap.add_argument("--shutdown-timeout", type=float, default=10.0, dest="shutdown_timeout_s")
    ap.add_argument("--health-timeout", type=float, default=20.0, dest="health_timeout_s")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--skip-tokenizer-init", action="store_true",
                    help="load no tokenizer: requests must send token ids and get token ids "
                    "back (implied for models without a tokenizer, e.g. --load-format dummy)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--page-size", type=int, default=None)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--schedule-policy", default=None)
    ap.add_argument("--disable-prefix-cache", action="store_const", const=False, default=None,
                    dest="enable_prefix_cache")
    ap.add_argument("--chunked-prefill-size", type=int, default=None)
    ap.add_argument("--max-running-requests", type=int, default=None)
    ap.add_argument("--max-context-len", type=int, default=None)
    ap.add_argument("--load-format", default=None)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--debug-invariants", action="store_const", const=True, default=None)
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="share of GPU memory for weights + KV pool (the KV pool gets what is free)")
    ap.add_argument("--disable-cuda-graph", action="store_const", const=True, default=None)
    ap.add_argument("--cuda-graph-max-batch", type=int, default=None)
    ap.add_argument("--disable-overlap", action="store_const", const=False, default=None,
                    dest="overlap_schedule",
                    help="read each step's tokens before launching the next (default on CUDA: overlap)")
    ap.add_argument("--enable-deterministic-inference", action="store_const", const=True,
                    default=None, dest="deterministic_inference",
                    help="batch-invariant GEMM and attention kernels (CUDA): outputs never depend "
                    "on the prefix cache, batch composition or chunking; slower")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    kw = {k: v for k, v in vars(args).items() if k != "command"}
    kw["api_keys"] = tuple(kw["api_keys"])
    return ServerConfig(**kw)


def serve_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="radixrt serve", description="Start the HTTP server.")
    add_serve_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    from radixrt.server.launcher import serve

    return serve(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: radixrt serve [--model PATH] [--host H] [--port P] [--api-key KEY] "
              "[--dp N] ...\n       radixrt serve --help")
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"radixrt: unknown command {argv[0]!r} (expected 'serve')", file=sys.stderr)
        return 2
    return serve_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

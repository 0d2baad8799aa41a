"""`radixrt serve|worker|keys ...`: the command-line entry point.

``serve`` runs the router and its local workers; ``worker --router tcp://HOST:PORT`` runs a
remote data-parallel replica that joins a router started with ``--remote-listen``; ``keys
--out DIR`` writes the CURVE key pairs both sides load (radixrt.server.keys).

Every flag has help text that states its default (``serve --help``); engine knobs left unset
fall through to EngineConfig's defaults, which the help names.
"""

from __future__ import annotations

import argparse
import sys

from radixrt.config import EngineConfig
from radixrt.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig

_SERVER = ServerConfig()
_ENGINE = EngineConfig()


def _tokens_or_auto(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count or 'auto', got {v!r}") from None


def _engine_default(name: str) -> str:
    return f"(default: engine default, {getattr(_ENGINE, name)!r})"


def add_serve_args(ap: argparse.ArgumentParser) -> None:
    a = ap.add_argument
    s = _SERVER
    # ---- network
    a("--served-model-name", default=None,
      help="name clients send as 'model' (default: the model's name and path)")
    a("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    a("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    a("--api-key", action="append", default=[], dest="api_keys",
      help="require 'Authorization: Bearer KEY' (repeat for several tenants; each key then gets "
      "its own cache namespace) (default: no keys, no auth)")
    a("--admin-api-key", action="append", default=[], dest="admin_api_keys",
      help="key for admin endpoints (/flush_cache) when keys are set; repeatable "
      "(default: none)")
    a("--metrics-require-key", action="store_true",
      help="/metrics needs a valid key too (default: off; /health never needs one)")
    a("--salt-from-key", action="store_true",
      help="bind cache namespaces to the request's API key, so tenants never share cache "
      "entries whatever cache_salt they send (default: off)")
    a("--dp", type=int, default=s.dp, help=f"data-parallel worker processes (default: {s.dp})")
    # ---- admission and limits
    a("--max-queued-requests", type=int, default=s.max_queued_requests,
      help="requests waiting for their first token, server-wide; more get a 503 "
      f"(default: {s.max_queued_requests})")
    a("--max-request-tokens", type=int, default=None,
      help="cap on a request's max_tokens (default: the context window)")
    a("--max-request-bytes", type=int, default=s.max_request_bytes,
      help=f"largest request body; larger get a 413 (default: {s.max_request_bytes})")
    a("--max-json-depth", type=int, default=s.max_json_depth,
      help=f"deepest JSON nesting in a body (default: {s.max_json_depth})")
    a("--max-sequences-per-request", type=int, default=s.max_sequences_per_request,
      help=f"prompts x n of one request (default: {s.max_sequences_per_request})")
    a("--allow-request-chat-template", action="store_true",
      help="accept a client-supplied chat_template (sandboxed Jinja, time-bounded) "
      "(default: off)")
    a("--chat-template-timeout", type=float, default=s.chat_template_timeout_s,
      dest="chat_template_timeout_s",
      help=f"seconds a client chat template may render (default: {s.chat_template_timeout_s})")
    a("--request-timeout", type=float, default=None, dest="request_timeout_s",
      help="per-request deadline in seconds from arrival; past it the request is aborted with "
      "an error (default: none)")
    # ---- supervision and lifecycle
    a("--worker-hang-timeout", type=float, default=s.worker_hang_timeout_s,
      dest="worker_hang_timeout_s",
      help="a worker silent this many seconds is hung: its requests fail and it is replaced "
      f"(default: {s.worker_hang_timeout_s})")
    a("--max-worker-restarts", type=int, default=s.max_worker_restarts,
      help="restarts of one worker allowed per 10 minutes before it stays dead "
      f"(default: {s.max_worker_restarts})")
    a("--shutdown-timeout", type=float, default=s.shutdown_timeout_s, dest="shutdown_timeout_s",
      help="seconds in-flight responses get after SIGTERM/SIGINT "
      f"(default: {s.shutdown_timeout_s})")
    a("--health-timeout", type=float, default=s.health_timeout_s, dest="health_timeout_s",
      help="/health fails when no worker answered for this many seconds "
      f"(default: {s.health_timeout_s})")
    _add_log_level(ap)
    # ---- remote workers (other hosts)
    a("--remote-listen", default=None,
      help="tcp://HOST:PORT where remote workers (radixrt worker --router) join; needs the "
      "CURVE flags below (default: off, local workers only)")
    a("--curve-server-secret", default=None,
      help="the router's CURVE key pair file, server.key_secret from radixrt keys "
      "(default: none)")
    a("--curve-clients", default=None,
      help="directory of allowed remote-worker public keys (*.key); others are refused "
      "(default: none)")
    a("--max-remote-workers", type=int, default=s.max_remote_workers,
      help=f"remote workers that may join (default: {s.max_remote_workers})")
    a("--skip-tokenizer-init", action="store_true",
      help="load no tokenizer: requests must send token ids and get token ids back (implied "
      "for models without a tokenizer, e.g. --load-format dummy) (default: off)")
    add_engine_args(ap)


def _add_log_level(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--log-level", default=_SERVER.log_level,
                    choices=("debug", "info", "warning", "error", "critical"),
                    help=f"logging level (default: {_SERVER.log_level})")


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The model and engine knobs (unset: EngineConfig's default); shared by serve and worker."""
    a = ap.add_argument
    a("--model", default=None, help="local HF directory or .gguf file; hub ids are not fetched "
      "(default: the default model, SmolLM2-135M-Instruct)")
    a("--device", default=None, help="cpu, cuda or cuda:N " + _engine_default("device"))
    a("--tp", type=int, default=None, dest="tp_size",
      help="tensor parallelism: split the model over N ranks (on CUDA, GPUs device..device+N-1; "
      "on CPU, N processes over gloo) " + _engine_default("tp_size"))
    a("--nnodes", type=int, default=None,
      help="hosts one --tp replica spans (tp/nnodes ranks each); this one is node 0, the others "
      "run radixrt node " + _engine_default("nnodes"))
    a("--dist-init-addr", default=None,
      help="HOST:PORT of node 0's torch.distributed rendezvous (TCPStore), reachable from every "
      "node; needed with --nnodes > 1 (default: none)")
    a("--dtype", default=None,
      help="float32, bfloat16, float16 or auto (float32 on CPU, bfloat16 on CUDA) "
      + _engine_default("dtype"))
    a("--page-size", type=int, default=None,
      help="tokens per KV page, a power of two " + _engine_default("page_size"))
    a("--kv-cache-tokens", type=int, default=None,
      help="KV pool size in tokens (default: from free GPU memory; on CPU 16384 tokens or 1 GiB)")
    a("--host-kv-cache-tokens", type=_tokens_or_auto, default=None,
      help="host KV tier behind the GPU pool, in tokens (pinned RAM on CUDA; 0 = off, the "
      "default). A GPU eviction writes pages down, a hit there loads them back instead of "
      "recomputing. 'auto' = 4x the GPU pool within 40%% of the available RAM; size it to the "
      "working set (Llama-3-8B in bf16: 128 KiB per token, so 800000 tokens = 100 GB)")
    a("--schedule-policy", default=None, choices=("lpm", "fcfs"),
      help="lpm (longest prefix match first) or fcfs " + _engine_default("schedule_policy"))
    a("--disable-prefix-cache", action="store_const", const=False, default=None,
      dest="enable_prefix_cache", help="turn the radix prefix cache off (default: on)")
    a("--chunked-prefill-size", type=int, default=None,
      help="max prompt tokens computed for one request per step "
      + _engine_default("chunked_prefill_size"))
    a("--max-running-requests", type=int, default=None,
      help="max sequences in a batch " + _engine_default("max_running_requests"))
    a("--max-context-len", type=int, default=None,
      help="context window (default: the model's max_position_embeddings)")
    a("--load-format", default=None, choices=("auto", "safetensors", "gguf", "dummy"),
      help="weights format; dummy = random weights for a preset or config.json "
      + _engine_default("load_format"))
    a("--attention-backend", default=None, choices=("auto", "torch", "triton", "flashinfer"),
      help="attention implementation " + _engine_default("attention_backend"))
    a("--prefill-attention", default=None, choices=("triton", "flashinfer"),
      help="the triton backend's prefill kernels; flashinfer: its FA3 paged prefill "
      + _engine_default("prefill_attention"))
    a("--seed", type=int, default=None,
      help="engine seed (dummy weights, unseeded sampling) " + _engine_default("seed"))
    a("--debug-invariants", action="store_const", const=True, default=None,
      help="check cache/pool invariants whenever the engine is idle (default: off)")
    a("--mem-fraction", type=float, default=None,
      help="share of GPU memory for weights + KV pool (the KV pool gets what is free) "
      + _engine_default("mem_fraction"))
    a("--disable-cuda-graph", action="store_const", const=True, default=None,
      help="run every step eagerly, without CUDA graphs (default: graphs on CUDA)")
    a("--skip-warmup", action="store_const", const=False, default=None, dest="warmup",
      help="start serving without the start-up warm-up requests that compile kernels first "
      "(default: warm up on CUDA)")
    a("--cuda-graph-max-batch", type=int, default=None,
      help="largest decode batch replayed as a CUDA graph "
      + _engine_default("cuda_graph_max_batch"))
    a("--piecewise-cuda-graph-max-tokens", type=int, default=None,
      help="prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs "
      "(attention eager between them); 0 = off "
      + _engine_default("piecewise_cuda_graph_max_tokens"))
    a("--disable-overlap", action="store_const", const=False, default=None,
      dest="overlap_schedule",
      help="read each step's tokens before launching the next (default: overlap on CUDA, off "
      "on CPU)")
    a("--enable-deterministic-inference", action="store_const", const=True,
      default=None, dest="deterministic_inference",
      help="batch-invariant GEMM and attention kernels (CUDA): outputs never depend on the "
      "prefix cache, batch composition or chunking; slower (default: off)")
    a("--cascade-decode", default=None, choices=("auto", "on", "off"),
      help="shared-prefix decode attention: requests sharing a cached prefix read it once per "
      "group per step; auto = on with the Triton backend on CUDA unless deterministic "
      + _engine_default("cascade_decode"))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    kw = {k: v for k, v in vars(args).items() if k != "command"}
    kw["api_keys"] = tuple(kw["api_keys"])
    kw["admin_api_keys"] = tuple(kw["admin_api_keys"])
    return ServerConfig(**kw)


def serve_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="radixrt serve", description="Start the HTTP server.")
    add_serve_args(ap)
    return ap


def serve_main(argv: list[str] | None = None) -> int:
    ap = serve_parser()
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    from radixrt.server.launcher import serve

    return serve(cfg)


def worker_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="radixrt worker",
        description="Run a data-parallel replica that joins a router on another host "
        "(started with --remote-listen) over ZeroMQ TCP with CURVE keys.")
    ap.add_argument("--router", required=True,
                    help="the router's --remote-listen address, tcp://HOST:PORT")
    ap.add_argument("--curve-client-secret", required=True,
                    help="this worker's CURVE key pair file (client.key_secret from "
                    "radixrt keys; its public key must be in the router's --curve-clients)")
    ap.add_argument("--curve-server-public", required=True,
                    help="the router's public key file (server.key from radixrt keys)")
    _add_log_level(ap)
    add_engine_args(ap)
    return ap


def worker_main(argv: list[str] | None = None) -> int:
    ap = worker_parser()
    args = ap.parse_args(argv)
    own = {"router": args.router, "client_secret": args.curve_client_secret,
           "server_public": args.curve_server_public}
    kw = {k: v for k, v in vars(args).items()
          if k not in ("router", "curve_client_secret", "curve_server_public")}
    try:
        cfg = ServerConfig(**kw)
        if not own["router"].startswith("tcp://"):
            raise ValueError(f"--router must be tcp://HOST:PORT, got {own['router']!r}")
    except ValueError as e:
        ap.error(str(e))
    from radixrt.server.remote_worker import run_remote_worker

    return run_remote_worker(cfg, own["router"], own["client_secret"], own["server_public"])


def keys_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="radixrt keys",
                                 description="Write CURVE key pairs for remote workers.")
    ap.add_argument("--out", required=True, help="directory to create the key files in (0700)")
    args = ap.parse_args(argv)
    from radixrt.server.keys import generate

    try:
        paths = generate(args.out)
    except (FileExistsError, RuntimeError) as e:
        print(f"radixrt keys: {e}", file=sys.stderr)
        return 1
    print(f"router:  --curve-server-secret {paths['server_secret']} "
          f"--curve-clients {paths['clients_dir']}")
    print(f"workers: --curve-client-secret {paths['client_secret']} "
          f"--curve-server-public {paths['server_public']}")
    return 0


def node_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="radixrt node",
        description="Run this host's ranks of a tensor-parallel replica whose rank 0 is a "
        "server or worker started with the same --tp/--nnodes/--dist-init-addr and engine flags.")
    ap.add_argument("--node-rank", type=int, required=True,
                    help="this host's index, 1 .. nnodes-1 (node 0 is the server)")
    _add_log_level(ap)
    add_engine_args(ap)
    args = ap.parse_args(argv)
    node_rank = args.node_rank
    kw = {k: v for k, v in vars(args).items() if k != "node_rank"}
    try:
        cfg = ServerConfig(**kw)
        ecfg = cfg.engine_config()
        if ecfg.nnodes < 2 or not 1 <= node_rank < ecfg.nnodes:
            raise ValueError(f"--node-rank must be in [1, nnodes-1] with --nnodes >= 2, got "
                             f"node {node_rank} of {ecfg.nnodes}")
    except ValueError as e:
        ap.error(str(e))
    import logging

    from radixrt.distributed.node import run_node

    logging.basicConfig(level=cfg.log_level.upper(),
                        format=f"%(asctime)s node{node_rank} %(levelname)s %(message)s")
    return run_node(ecfg, node_rank)


COMMANDS = {"serve": serve_main, "worker": worker_main, "keys": keys_main, "node": node_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: radixrt serve [--model PATH] [--host H] [--port P] [--api-key KEY] "
              "[--dp N] ...\n       radixrt worker --router tcp://HOST:PORT "
              "--curve-client-secret F --curve-server-public F [--model PATH] ..."
              "\n       radixrt keys --out DIR\n       radixrt node --node-rank K --nnodes N "
              "--dist-init-addr HOST:PORT --tp T [--model PATH] ...\n       radixrt COMMAND --help")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"radixrt: unknown command {argv[0]!r} (expected one of: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the DSL examples: an in-process engine, or a server when --url is given."""

from __future__ import annotations

import argparse

from radixrt.lang import Backend, EngineBackend, RuntimeEndpoint


def add_backend_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="HF directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--url", default=None, help="a running radixrt server instead of in-process")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tokenizer", default=None,
                    help="for --url: a local tokenizer for the chat template (default: the "
                         "template the server reports in /get_model_info)")


def make_backend(args: argparse.Namespace) -> Backend:
    if args.url:
        return RuntimeEndpoint(args.url, api_key=args.api_key, tokenizer=args.tokenizer)
    return EngineBackend(model=args.model)

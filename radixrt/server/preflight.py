"""Start-up checks that run before anything heavy: the port, and the model path's config.

A busy port or a wrong model path must fail in a second with one line, not after the model has
been loaded (or after a worker traceback). The router binds the listening socket here and hands
it to uvicorn, so the check cannot race with another server taking the port meanwhile.
Deliberately light: no torch import, only files and JSON.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

from radixrt.server.config import ServerConfig

# "org/name" or "org/name@rev": what a Hugging Face hub id looks like when it is not a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
_GGUF_MAGIC = b"GGUF"


class StartupError(Exception):
    """A one-line reason the server cannot start."""


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket, as uvicorn would bind it."""
    addr = "127.0.0.1" if host == "localhost" else host
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Like uvicorn: allows restarting on a port in TIME_WAIT, never two listeners on one port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                           "(is another server running there? pick another --port)") from None
    sock.set_inheritable(False)
    return sock


def check_remote(cfg: ServerConfig) -> None:
    """The CURVE files of --remote-listen load (a wrong path fails here, not in the router)."""
    if cfg.remote_listen is None:
        return
    from radixrt.server import keys

    assert cfg.curve_server_secret and cfg.curve_clients, "ServerConfig validates the pair"
    try:
        keys.load_pair(cfg.curve_server_secret)
        keys.load_allowed(cfg.curve_clients)
    except (OSError, ValueError) as e:
        raise StartupError(f"remote workers: cannot load the CURVE keys: {e} "
                           "(create them with radixrt keys --out DIR)") from None


def check_model(cfg: ServerConfig) -> None:
    """Raise StartupError unless the model the workers will load plausibly exists."""
    if cfg.model is None:
        _check_default_model()
        return
    if cfg.load_format == "dummy":
        _check_dummy(cfg.model)
        return
    path = Path(cfg.model).expanduser()
    if not path.exists():
        hint = ""
        if _HUB_ID.match(cfg.model) and not cfg.model.startswith((".", "/", "~")):
            hint = (f"; it looks like a Hugging Face hub id, and hub ids are not fetched: "
                    f"download it first (e.g. `huggingface-cli download {cfg.model} "
                    f"--local-dir DIR`) and pass --model DIR")
        raise StartupError(f"model path {cfg.model!r} does not exist{hint}")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise StartupError(f"model file {cfg.model!r} is not a GGUF file; pass a "
                                   "Hugging Face directory (config.json + *.safetensors) or a "
                                   ".gguf file")
        return
    _read_config(path)
    has_weights = (path / "model.safetensors.index.json").is_file() or any(
        path.glob("*.safetensors"))
    if not has_weights:
        raise StartupError(f"no *.safetensors weights in model directory {cfg.model!r}")


def _read_config(directory: Path) -> dict[str, object]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise StartupError(f"no config.json in model directory {str(directory)!r}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StartupError(f"cannot read {str(config_path)!r}: {e}") from None
    if not isinstance(config, dict) or not (config.get("architectures")
                                            or config.get("model_type")):
        raise StartupError(f"{str(config_path)!r} names no architectures / model_type")
    return config


def _check_dummy(model: str) -> None:
    from radixrt.models.presets import PRESETS

    if model in PRESETS:
        return
    directory = Path(model).expanduser()
    if not directory.is_dir():
        raise StartupError(f"--load-format dummy needs a preset name or a directory with "
                           f"config.json, got {model!r}; presets: {', '.join(PRESETS)}")
    _read_config(directory)


def _check_default_model() -> None:
    from radixrt.models.default import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as e:
        raise StartupError(f"the default model is not installed ({e}); run `make run` once or "
                           "pass --model PATH") from None

"""CURVE keys for remote workers: ``radixrt keys --out DIR`` and the loaders behind the flags.

A remote worker and the router talk over ZeroMQ TCP secured with CURVE (Curve25519 key
exchange, every frame encrypted and authenticated). The router is the CURVE *server*: it holds
the server key pair and an allow-list of client public keys; each remote worker holds a client
key pair and the server's public key. A peer whose public key is not on the allow-list is
refused during the handshake (ZAP), before any message reaches the router.

Files are in ZeroMQ's certificate format (``zmq.auth.load_certificate`` reads them), created
with mode 0600 in a 0700 directory:

    DIR/server.key_secret        router: --curve-server-secret (public + secret)
    DIR/server.key               workers: --curve-server-public
    DIR/client.key_secret        workers: --curve-client-secret (public + secret)
    DIR/clients/client.key       router: --curve-clients DIR/clients (the allow-list)

Several workers may share one client key, or each get its own (run ``radixrt keys`` again for
the client part and copy its ``client.key`` into the router's allow-list directory).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import zmq
import zmq.auth

_HEADER = "#   ****  radixrt CURVE certificate, generated {when}  ****\n"
_SECRET_NOTE = "#   Secret: do not share this file, keep its mode 0600.\n"


def _write(path: str, public: bytes, secret: bytes | None) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    body = [_HEADER.format(when=when)]
    if secret is not None:
        body.append(_SECRET_NOTE)
    body += ["\nmetadata\ncurve\n", f'    public-key = "{public.decode()}"\n']
    if secret is not None:
        body.append(f'    secret-key = "{secret.decode()}"\n')
    # O_EXCL: never overwrite (or follow a planted link to) an existing key file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(body))


def generate(out_dir: str) -> dict[str, str]:
    """Write a server and a client key pair under ``out_dir``; returns the paths by role."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    clients = os.path.join(out_dir, "clients")
    os.makedirs(clients, mode=0o700, exist_ok=True)
    paths = {
        "server_secret": os.path.join(out_dir, "server.key_secret"),
        "server_public": os.path.join(out_dir, "server.key"),
        "client_secret": os.path.join(out_dir, "client.key_secret"),
        "clients_dir": clients,
    }
    existing = [p for k, p in paths.items() if k != "clients_dir" and os.path.exists(p)]
    if existing or os.path.exists(os.path.join(clients, "client.key")):
        raise FileExistsError(f"keys already exist in {out_dir} (refusing to overwrite)")
    s_pub, s_sec = zmq.curve_keypair()
    c_pub, c_sec = zmq.curve_keypair()
    _write(paths["server_secret"], s_pub, s_sec)
    _write(paths["server_public"], s_pub, None)
    _write(paths["client_secret"], c_pub, c_sec)
    _write(os.path.join(clients, "client.key"), c_pub, None)
    return paths


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key into a log
        return f"KeyPair(public={self.public.decode()!r}, secret=<hidden>)"


def load_pair(path: str) -> KeyPair:
    pub, sec = zmq.auth.load_certificate(path)
    if not sec:
        raise ValueError(f"{path} holds no secret key (pass the .key_secret file)")
    return KeyPair(pub, sec)


def load_public(path: str) -> bytes:
    pub, _ = zmq.auth.load_certificate(path)
    return pub


def load_allowed(clients_dir: str) -> frozenset[bytes]:
    """The client public keys allowed to join: every ``*.key`` file in ``clients_dir``."""
    keys = frozenset(zmq.auth.load_certificates(clients_dir).keys())
    if not keys:
        raise ValueError(f"no client public keys (*.key) in {clients_dir}")
    return keys


def curve_client(sock: zmq.Socket, own: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is ``server_public``."""
    sock.curve_secretkey = own.secret
    sock.curve_publickey = own.public
    sock.curve_serverkey = server_public

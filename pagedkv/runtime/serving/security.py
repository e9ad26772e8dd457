"""Who may talk to the server: loopback by default, CurveZMQ keys for anything else.

Key directory layout (written by `pagedkv keys DIR`):
    DIR/server.key, DIR/server.key_secret   the server's pair (give clients server.key)
    DIR/NAME.key, DIR/NAME.key_secret       one pair per client
    DIR/authorized/NAME.key                 the public keys the server accepts
"""
from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

LOOPBACK_HOSTS = {"localhost", "::1", "[::1]"}


def is_local_address(address: str) -> bool:
    """ipc:// and inproc:// addresses, and tcp:// on a loopback host."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise ValueError(f"not a ZeroMQ address: {address!r} (expected e.g. tcp://127.0.0.1:5555 or ipc:///tmp/x)")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        raise ValueError(f"unsupported transport {scheme!r} in {address!r}: use tcp:// or ipc://")
    host = rest.rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_bind(address: str, curve_keys: str | None, insecure: bool) -> None:
    """Only loopback and ipc:// go without CurveZMQ, unless the operator says --insecure."""
    if not curve_keys and not insecure and not is_local_address(address):
        raise ValueError(f"refusing to bind {address} without encryption: configure CurveZMQ keys "
                         "(`pagedkv keys DIR`, then --curve-keys DIR) or pass --insecure")


def write_keys(directory: str | Path, clients: list[str]) -> list[Path]:
    """Creates the server's pair (once) and a pair per client name; returns the files written."""
    root = Path(directory)
    authorized = root / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names = ([] if (root / "server.key_secret").exists() else ["server"]) + list(clients)
    for name in names:
        if name != "server" and (name == "authorized" or (root / f"{name}.key").exists()):
            raise ValueError(f"a key named {name!r} already exists in {root}")
        public, secret = zmq.auth.create_certificates(str(root), name)
        written += [Path(public), Path(secret)]
        if name != "server":
            written.append(Path(shutil.copy(public, authorized / f"{name}.key")))
    return written


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise ValueError(f"missing key file {path} (create keys with `pagedkv keys DIR`)")
    return zmq.auth.load_certificate(str(path))


def secure_server(context: zmq.Context, socket: zmq.Socket, directory: str | Path) -> ThreadAuthenticator:
    """Makes `socket` a CURVE server that admits only the keys in DIR/authorized. Call before bind."""
    root = Path(directory)
    public, secret = _load(root / "server.key_secret")
    if not (root / "authorized").is_dir():
        raise ValueError(f"{root / 'authorized'} is missing: no client could ever be admitted")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(root / "authorized"))
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    return auth


def secure_client(socket: zmq.Socket, directory: str | Path, name: str = "client") -> None:
    """Makes `socket` a CURVE client with the pair NAME and the server's public key. Call before connect."""
    root = Path(directory)
    server_public, _ = _load(root / "server.key")
    public, secret = _load(root / f"{name}.key_secret")
    socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = server_public, public, secret

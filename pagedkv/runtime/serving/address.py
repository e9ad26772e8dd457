"""Is a bind address free? Asked before the model loads, so that a second `pagedkv serve`
on a taken port says so at once instead of after seconds of loading."""
from __future__ import annotations

import socket

import zmq


def check_free(address: str) -> None:
    """ValueError naming the address and what to do when something already listens there."""
    scheme, _, rest = address.partition("://")
    if scheme == "ipc":
        _check_ipc(address, rest)
    elif scheme == "tcp" and not rest.endswith((":*", ":0")):  # a wildcard port is always free
        _check_tcp(address)


def _taken(address: str) -> ValueError:
    return ValueError(f"{address} is already in use (another `pagedkv serve`?): choose another address "
                      "with --bind, e.g. --bind tcp://127.0.0.1:* for any free port")


def _check_tcp(address: str) -> None:
    # A throwaway ZeroMQ socket binds exactly as the server's will (same options, same parsing).
    probe = zmq.Context.instance().socket(zmq.ROUTER)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.bind(address)
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            raise _taken(address) from None
        raise ValueError(f"cannot bind {address}: {e}; check --bind") from None
    finally:
        probe.close()


def _check_ipc(address: str, path: str) -> None:
    # ZeroMQ would take an ipc:// path over from a live server; a connection tells if one is there.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # no file, or a stale one that the server may replace
    finally:
        probe.close()
    raise _taken(address)

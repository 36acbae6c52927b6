"""Loaded by every Python process of a test that puts this folder on PYTHONPATH: any connection or name lookup
to a host that is not loopback is refused and recorded in $MISGUARD_NETLOG, so a test can prove none happened."""
import ipaddress
import os
import socket

_LOG = os.environ.get("MISGUARD_NETLOG")
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def _is_loopback(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what):
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what}\n")
    raise OSError(f"network blocked by test: {what}")


def _check(address):
    if isinstance(address, tuple) and not _is_loopback(address[0]):
        _refuse(f"connect {address!r}")


def connect(self, address):
    _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _is_loopback(host):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo

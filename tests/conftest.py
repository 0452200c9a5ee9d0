"""Test setup: no test may reach the network, and none needs a GPU unless marked."""

import ipaddress
import os
import socket

import pytest

# Offline switches of the libraries that would otherwise download (set before they import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


class NetworkAccessError(RuntimeError):
    """Raised when a test opens a connection to anything but this machine."""


def _is_local(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guard(address) -> None:
    if isinstance(address, tuple) and not _is_local(address[0]):
        raise NetworkAccessError(f"a test tried to reach {address[0]}: tests must not touch the network")


def _guarded_connect(self, address):
    _guard(address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _guard(address)
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode()
    if not _is_local(host) and host != socket.gethostname():
        raise NetworkAccessError(f"a test tried to resolve {host}: tests must not touch the network")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

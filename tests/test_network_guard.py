"""The test setup refuses network access loudly."""

import socket
import urllib.request

import pytest
from conftest import NetworkAccessError


def test_outbound_connection_is_refused():
    with pytest.raises(NetworkAccessError, match="must not touch the network"):
        urllib.request.urlopen("https://github.com", timeout=1)


def test_loopback_is_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket()
    client.connect(server.getsockname())
    client.close()
    server.close()

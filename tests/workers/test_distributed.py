"""The rendezvous store listens on the address it is given, not on every interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.distributed import create_store

PROC_TCP = Path("/proc/net/tcp")
LISTEN = "0A"


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses (as /proc/net/tcp hex) listening on `port`."""
    found = set()
    for line in PROC_TCP.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == LISTEN and int(hex_port, 16) == port:
            found.add(addr)
    return found


@pytest.mark.skipif(not PROC_TCP.exists(), reason="needs Linux /proc/net/tcp")
def test_store_listens_on_loopback_only() -> None:
    store, port = create_store("127.0.0.1", timeout_s=5)
    store.set("probe", "1")
    assert store.get("probe") == b"1"
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, little-endian hex

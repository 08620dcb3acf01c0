"""The readers behind Handle.traffic (backends/traffic.py), on golden text and real sockets."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import trio

from jitlaunch.backends.traffic import (
    ConnectionCounter,
    SocketTable,
    hex_address,
    index_table,
    tap_packets_sent,
)

# Three lines of a little-endian host's /proc/net/tcp: 127.5.0.65:8080 listening, a client
# (127.0.0.1:55642) connected to it, and that client's own end.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 4100057F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 389476 1 0
 299: 4100057F:1F90 0100007F:D95A 01 00000000:00000000 00:00000000 00000000     0        0 389478 1 0
 593: 0100007F:D95A 4100057F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 389477 2 0
 594: 0100007F:D95B 0100007F:0035 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0
 bad line
 595: 4100057F:1F90 0100007F:D95C zz 00000000:00000000
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="the golden text is a little-endian host's")
def test_hex_address_as_the_kernel_prints_it() -> None:
    assert hex_address("127.0.0.1") == "0100007F"
    assert hex_address("127.5.0.65") == "4100057F"
    assert hex_address("::1") == "00000000000000000000000001000000"
    assert hex_address("fd00::2") == "000000FD000000000000000002000000"


@pytest.mark.skipif(sys.byteorder != "little", reason="the golden text is a little-endian host's")
def test_index_table_keeps_both_ends_and_leaves_listeners_out() -> None:
    got = index_table(TCP)
    assert got["4100057F"] == [("4100057F:1F90", "0100007F:D95A", 1),
                               ("0100007F:D95A", "4100057F:1F90", 1)]
    assert got["0100007F"] == [*got["4100057F"], ("0100007F:D95B", "0100007F:0035", 6)]
    assert set(got) == {"4100057F", "0100007F"}


def test_connection_counter_counts_new_and_open_connections() -> None:
    c = ConnectionCounter("127.5.0.65", [8080])
    server = ("4100057F:1F90", "0100007F:D95A", 1)
    other_port = ("4100057F:0050", "0100007F:D95B", 1)  # not one of the service's ports
    assert c.update([server, other_port]) == 2  # new, and established
    assert c.update([server]) == 3  # still open: in use
    closed = (server[0], server[1], 6)  # TIME_WAIT: no longer open, not new
    assert c.update([closed]) == 3
    assert c.update([closed, ("4100057F:1F90", "0100007F:D960", 6)]) == 4  # one came and went
    assert c.update([]) == 4


def test_tap_packets_sent_reads_rx_packets(tmp_path: Path) -> None:
    stats = tmp_path / "jlt1" / "statistics"
    stats.mkdir(parents=True)
    (stats / "rx_packets").write_text("42\n")
    (stats / "tx_packets").write_text("99\n")
    assert tap_packets_sent("jlt1", str(tmp_path)) == 42
    with pytest.raises(OSError):
        tap_packets_sent("jlt2", str(tmp_path))


async def test_socket_table_sees_real_connections_and_is_shared(block: str) -> None:
    """A real listener and client on loopback; two instances asking at once share one read."""
    address = f"{block}.65"
    with socket.socket() as listener:
        listener.bind((address, 0))
        listener.listen()
        port = listener.getsockname()[1]
        counter = ConnectionCounter(address, [port])
        assert counter.update(await SocketTable().entries(address)) == 0
        with socket.create_connection((address, port)):
            accepted, _ = listener.accept()
            with accepted:
                table = SocketTable()  # (one read just now would serve for TABLE_AGE)
                entries = await table.entries(address)
                assert len(entries) == 2  # both ends, listener left out
                assert counter.update(entries) == 4  # two new, two established
                reads = table.reads
                async with trio.open_nursery() as n:
                    for _ in range(5):
                        n.start_soon(table.entries, address)
                assert table.reads == reads  # within TABLE_AGE: no new read

"""The control socket under a client that sends requests and never reads its replies: the daemon
stops reading from it (its replies wait in a bounded buffer), its memory stays flat, and everyone
else is served."""

from __future__ import annotations

import socket

from polarkvd.wire import frames as P


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_cannot_grow_the_daemons_memory(daemon) -> None:
    pid = daemon.proc.pid
    before = rss_mib(pid)
    batch = b"".join(P.pack([1, i, "stats", {}]) for i in range(1000))  # ~1.3 KB of reply each
    sent = 0
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.control_socket))
        s.settimeout(2)
        try:
            for _ in range(100):  # 100,000 requests: ~130 MB of replies if they were all kept
                s.sendall(batch)
                sent += len(batch)
        except TimeoutError:
            pass  # the daemon stopped reading: the kernel's buffers are full
        assert sent < 100 * len(batch), "the daemon read every request of a client that never reads"
        grown = rss_mib(pid) - before
        assert grown < 40, f"the daemon's memory grew {grown:.0f} MiB"
        with daemon.control() as c:  # others are served meanwhile
            assert c.stats()["sessions"] == []
        s.settimeout(30)  # and the replies it did make are all there, in order, once it reads
        got = P.FrameReader(P.MAX_FRAME)
        replies: list = []
        while len(replies) < 1000:
            replies += [P.unpack(f) for f in got.feed(s.recv(1 << 16))]
        assert [r[1] for r in replies[:1000]] == list(range(1000)) and replies[0][2] == 0

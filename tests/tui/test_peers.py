"""The peers screen: the cluster as a daemon sees it.

Snapshots (80x24 and 132x40, frozen clock) of a single-host daemon and of a three-member cluster
with a suspect and a dead member; the member rows and cluster numbers as pure functions; and the
dashboard against two real daemons that form a cluster on loopback.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from polarkvd.client import ControlClient
from polarkvd.config import option_fields
from polarkvd.errors import ErrorCode, PolarKVError
from polarkvd.tui import model as M
from polarkvd.tui import panels
from polarkvd.tui.app import PolarKVApp
from tests.tui.conftest import screen_text, showing, until
from tests.tui.recorded import PAGE, SERIES, SOCKET, STATS, UPDATED, VIEW, MiB, _wave

GiB = 1024 * MiB
SIZES = [(80, 24), (132, 40)]

# ---------------------------------------------------------------------------------------- a frozen cluster

REPORT = {
    "enabled": True,
    "node_id": "kv-b",
    "gossip_address": "tcp://10.0.0.12:7946",
    "data_address": "tcp://10.0.0.12:7947",
    "authenticated": True,
    "incarnation": 3,
    "alive": 2,
    "members": [  # as the daemon sends them: by name
        {"node": "kv-a", "addr": "tcp://kv-a.rack2.dc1.internal:7946", "state": "suspect", "incarnation": 7,
         "for_s": 1.4, "self": False,
         "meta": {"v": "0.4.0", "data": "tcp://kv-a.rack2.dc1.internal:7947", "dram": [31 * GiB, 64 * GiB],
                  "disk": [400 * GiB, 1024 * GiB], "dmp": [9 * GiB, 16 * GiB]}},
        {"node": "kv-b", "addr": "tcp://10.0.0.12:7946", "state": "alive", "incarnation": 3, "for_s": 3721.0,
         "self": True,
         "meta": {"v": "0.4.0", "data": "tcp://10.0.0.12:7947", "dram": [48 * GiB, 64 * GiB],
                  "disk": [120 * GiB, 1024 * GiB], "dmp": [540 * PAGE, 8 * GiB]}},
        {"node": "kv-c", "addr": "tcp://10.0.0.13:7946", "state": "dead", "incarnation": 2, "for_s": 95.0,
         "self": False,
         "meta": {"v": "0.3.9", "data": "tcp://10.0.0.13:7947", "dram": [60 * GiB, 64 * GiB],
                  "disk": [10 * GiB, 1024 * GiB], "dmp": [15 * GiB, 16 * GiB]}},
    ],
    "gossip": {"packets_in": 81_200, "packets_out": 80_950, "bad_packets": 0, "probes": 14_800,
               "indirect_probes": 12, "refutes": 1, "suspicions": 3, "push_pulls": 124},
    "metamap": {"announcements_sent": 5_100, "owned_records": 20_400, "members": 2},
    "transport": {"connections": 6, "requests": 9_000, "bytes_in": 3 * GiB, "bytes_out": 2 * GiB},
    "dmp": {"pages": 540, "bytes": 540 * PAGE, "used_bytes": 540 * PAGE, "capacity_bytes": 8 * GiB,
            "stored_pages": 1_210, "evicted_pages": 0, "served_pages": 830, "refused_pages": 0},
}  # fmt: skip

CLUSTER_COUNTERS = {
    "hit_pages_remote": 41_200, "fetched_pages_remote": 40_950, "fetched_bytes_remote": 40_950 * PAGE,
    "cluster_served_pages": 22_300, "cluster_served_bytes": 22_300 * PAGE, "demoted_pages_dmp": 5_020,
    "demoted_bytes_dmp": 5_020 * PAGE, "cluster_fetch_failures": 17,
}  # fmt: skip
CLUSTER_STATS = {**STATS, "counters": {**STATS["counters"], **CLUSTER_COUNTERS}}
CLUSTER_SERIES = {
    **SERIES,
    "hit_pages_remote": _wave(300, 120.0, 80.0, 10.0),
    "fetched_bytes_remote": _wave(300, 0.7e9, 0.5e9, 10.0),
    "cluster_served_bytes": _wave(300, 0.3e9, 0.25e9, 6.0),
    "demoted_bytes_dmp": _wave(300, 40e6, 40e6, 15.0),
    "cluster_fetch_failures": tuple(1.0 if i in (40, 41, 290) else 0.0 for i in range(300)),
}
CLUSTER_VIEW = M.View(
    socket=SOCKET, connected=True, stats=CLUSTER_STATS, knobs=VIEW.knobs, cluster=REPORT,
    series=CLUSTER_SERIES, updated=UPDATED,
)  # fmt: skip
STANDALONE_VIEW = M.View(
    socket=SOCKET, connected=True, stats=STATS, knobs=VIEW.knobs, cluster={"enabled": False},
    series=SERIES, updated=UPDATED,
)  # fmt: skip


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "view", [pytest.param(STANDALONE_VIEW, id="standalone"), pytest.param(CLUSTER_VIEW, id="cluster")]
)
def test_peers_screen(snap_compare, utc, view: M.View, size: tuple[int, int]) -> None:
    app = PolarKVApp(SOCKET, connect=False, clock=lambda: UPDATED)
    assert snap_compare(app, terminal_size=size, run_before=showing("4", view))


# ---------------------------------------------------------------------------------------- pure parts


def test_members_come_self_first_then_by_name() -> None:
    rows = M.members(REPORT)
    assert [m.node for m in rows] == ["kv-b", "kv-a", "kv-c"]
    me = rows[0]
    assert me.is_self and me.state == "alive" and me.dram == (48 * GiB, 64 * GiB)
    assert me.pool == (540 * PAGE, 8 * GiB)
    lends_none = {**REPORT["members"][1], "meta": {**REPORT["members"][1]["meta"], "dmp": [0, 0]}}
    assert M.members({"members": [lends_none]})[0].pool is None  # dmp [0, 0]: lends nothing
    assert rows[1].pool == (9 * GiB, 16 * GiB) and rows[1].data == "tcp://kv-a.rack2.dc1.internal:7947"
    assert M.state_counts(REPORT) == {"alive": 1, "suspect": 1, "dead": 1, "left": 0}
    # a member whose metadata is missing or malformed still gets a row
    odd = M.members({"members": [{"node": "x", "addr": "tcp://h:1", "state": "left", "meta": "?"}]})
    assert odd[0].dram is None and odd[0].data == "" and odd[0].version == ""


def test_member_row_cells_narrow_and_wide() -> None:
    me, suspect, dead = M.members(REPORT)
    narrow = [c.plain for c in panels.member_cells(me)]
    assert narrow == ["kv-b *", "alive", "3", "1h02m", "10.0.0.12:7946/7947", "48.0/64.0 GiB", "5.0/8.0 GiB"]
    assert len(narrow) == len(panels.MEMBER_COLUMNS)
    wide = [c.plain for c in panels.member_cells(suspect, wide=True)]
    assert len(wide) == len(panels.WIDE_MEMBER_COLUMNS)
    assert wide[:4] == ["kv-a", "suspect", "7", "1.4s"]
    assert wide[4:6] == ["kv-a.rack2.dc1.int…:7946", "kv-a.rack2.dc1.int…:7947"]  # cut to WIDE_ADDRESS
    assert wide[6:] == ["31.0/64.0 GiB", "7.0/16.0 GiB", "0.4.0"]  # pool: free / capacity
    # state colours; a dead member's last figures are dimmed
    cells = panels.member_cells(dead)
    assert cells[1].style == "bold red" and cells[6].style == "dim"
    assert panels.member_cells(suspect)[1].style == "bold yellow"
    assert panels.member_cells(me)[1].style == "green"


def test_addresses_are_cut_inside_the_host_never_the_port() -> None:
    assert M.address_text("tcp://10.0.0.12:7946", 24) == "10.0.0.12:7946"
    assert M.address_text("tcp://kv-a.rack2.dc1.internal:7946", 16) == "kv-a.rack2…:7946"
    assert M.address_text("tcp://[fd00::1:2:3:4]:7946", 14) == "[fd00::1…:7946"
    assert M.endpoints_text("tcp://10.0.0.12:7946", "tcp://10.0.0.12:7947", 21) == "10.0.0.12:7946/7947"
    long_host = "tcp://kv-a.rack2.dc1.internal"
    assert M.endpoints_text(f"{long_host}:7946", f"{long_host}:7947", 21) == "kv-a.rack2…:7946/7947"
    assert M.endpoints_text("tcp://10.0.0.12:7946", "", 21) == "10.0.0.12:7946"
    other_host = M.endpoints_text("tcp://10.0.0.12:7946", "tcp://10.1.0.12:7947", 21)
    assert len(other_host) <= 21 and other_host.endswith(":7947")
    for width in (8, 12, 21):
        assert len(M.address_text("tcp://a-very-long-host-name.internal:7946", width)) <= width


def test_space_cells() -> None:
    assert M.used_of((48 * GiB, 64 * GiB)) == "48.0/64.0 GiB"
    assert M.used_of((512 * MiB, 2 * GiB)) == "512.0 MiB/2.0 GiB"
    assert M.used_of((0, 64 * MiB)) == "0 B/64.0 MiB"
    assert M.used_of(None) == "–"
    assert M.pool_free((9 * GiB, 16 * GiB)) == "7.0/16.0 GiB"
    assert M.pool_free(None) == "–"


def test_header_says_insecure_in_a_warning_colour_and_counts_members() -> None:
    header = panels.cluster_header(CLUSTER_VIEW)
    assert "member kv-b  incarnation 3  CURVE-authenticated  v0.4.0" in header.plain
    assert "gossip tcp://10.0.0.12:7946  data tcp://10.0.0.12:7947" in header.plain
    insecure = panels.cluster_header(M.View(socket=SOCKET, cluster={**REPORT, "authenticated": False}))
    assert "INSECURE" in insecure.plain
    start = insecure.plain.index("INSECURE")
    assert any(s.start <= start < s.end and s.style == panels.WARNING for s in insecure.spans)
    assert panels.members_caption(CLUSTER_VIEW).plain.startswith("Members  2 of 3 alive (1 suspect), 1 dead")


def test_traffic_totals_and_rates() -> None:
    rows = M.cluster_traffic(CLUSTER_STATS)
    assert [(r.label, r.pages) for r in rows] == [
        ("found on peers", 41_200), ("fetched", 40_950), ("served to peers", 22_300),
        ("demoted to pool", 5_020), ("failed fetches", 17),
    ]  # fmt: skip
    assert rows[1].nbytes == 40_950 * PAGE and rows[0].nbytes is None
    assert [r.pages for r in M.cluster_traffic(STATS)] == [0] * 5  # a daemon that never saw a peer
    h = M.RateHistory()
    h.add(0.0, {"fetched_bytes_remote": 0})
    h.add(2.0, {"fetched_bytes_remote": 4_000_000, "cluster_fetch_failures": 2})
    assert h.series()["fetched_bytes_remote"] == (2e6,) and h.series()["cluster_fetch_failures"] == (1.0,)


def test_spark_buckets_to_its_width_newest_right() -> None:
    assert panels.spark([], 5) == "     "
    assert panels.spark([0.0, 0.0], 4) == "  ▁▁"
    assert panels.spark([0.0, 1.0, 2.0], 3) == "▁▅█"
    long = panels.spark([0.0] * 100 + [5.0], 10)  # one spike in 101 samples still shows
    assert len(long) == 10 and long[-1] == "█"


def test_remote_hits_count_in_the_hit_rate() -> None:
    asked, per, overall = M.hit_rates(CLUSTER_STATS)
    c = CLUSTER_STATS["counters"]
    assert overall == pytest.approx(
        (c["hit_pages_dram"] + c["hit_pages_disk"] + c["hit_pages_remote"]) / c["lookup_pages"]
    )
    lending = {**CLUSTER_STATS, "tiers": {**CLUSTER_STATS["tiers"], "dmp": {"tier": 3, "pages": 1}}}
    assert [t.label for t in M.tiers(lending)] == ["L2 DRAM", "L3 DMP", "L4 disk"]
    assert M.tiers(lending)[1].hits == c["hit_pages_remote"]


def test_standalone_panel_says_how_to_join() -> None:
    text = panels.peers_standalone(STANDALONE_VIEW).plain
    assert "Not in a cluster" in text and "enabled = true" in text
    assert "polarkvd keygen" in text and "docs/CLUSTER.md" in text
    old = panels.peers_standalone(M.View(socket=SOCKET, connected=True, cluster=M.NO_CLUSTER_OP)).plain
    assert "does not know the `cluster` control op" in old
    assert "no report yet" in panels.peers_standalone(M.View(socket=SOCKET, connected=True)).plain


def test_lent_pool_line() -> None:
    assert panels.lent_pool(CLUSTER_VIEW).plain.startswith(
        "lent pool 540 pages  3.0 GiB / 8.0 GiB 37%  stored 1,210"
    )
    none = panels.lent_pool(M.View(socket=SOCKET, cluster={k: v for k, v in REPORT.items() if k != "dmp"}))
    assert "lends no DRAM" in none.plain


# ---------------------------------------------------------------------------------------- real daemons

# several daemons at once: keep them off the one default metrics port
NO_METRICS = {"metrics.enabled": "false"} if "metrics.enabled" in option_fields() else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 120))


def test_two_daemons_in_a_cluster_show_up_alive(daemon_factory, tmp_path) -> None:
    from polarkvd.cluster.auth import generate, write_key_file

    key = tmp_path / "cluster.key"
    write_key_file(key, generate())
    gossip = f"127.0.0.1:{_free_port()}"
    common = {
        **NO_METRICS, "cluster.enabled": "true", "cluster.key_file": str(key), "cluster.seeds": gossip,
        "cluster.data_address": "127.0.0.1:0", "cluster.probe_interval": "200ms",
        "cluster.probe_timeout": "100ms",
    }  # fmt: skip
    a = daemon_factory({**common, "cluster.node_id": "node-a", "cluster.gossip_address": gossip}, name="a")
    b = daemon_factory(
        {**common, "cluster.node_id": "node-b", "cluster.gossip_address": f"127.0.0.1:{_free_port()}"},
        name="b",
    )

    async def scenario() -> None:
        app = PolarKVApp(b.control_socket, interval=0.2)
        async with app.run_test(size=(132, 40)) as pilot:
            await pilot.press("4")

            def both_alive() -> bool:
                rows = {m.node: m for m in M.members(app.view.cluster)}
                return {n: m.state for n, m in rows.items()} == {"node-a": "alive", "node-b": "alive"}

            await until(pilot, both_alive, timeout=30, what="both members alive in the dashboard's view")
            await until(pilot, lambda: "2 of 2 alive" in screen_text(app), what="the members table")
            text = screen_text(app)
            assert "polarkvd · peers" in text and "CURVE-authenticated" in text
            assert "member node-b" in text  # the header: the daemon we are attached to
            lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip().startswith("node-")}
            assert "*" in lines["node-b"] and "alive" in lines["node-b"]  # self: first, marked
            assert "alive" in lines["node-a"]
            assert text.index("node-b *") < text.index("node-a ")
            with ControlClient(a.control_socket) as c:
                a_gossip = c.cluster()["gossip_address"]
            assert a_gossip.split("://")[1] in text

    _run(scenario())


def test_a_daemon_without_the_cluster_op_is_not_a_cluster(daemon_factory, monkeypatch) -> None:
    d = daemon_factory(NO_METRICS)
    asked: list[int] = []

    def old_daemon(self: ControlClient) -> dict:
        asked.append(1)
        raise PolarKVError("unknown op 'cluster'", code=ErrorCode.UNKNOWN_OP)

    monkeypatch.setattr(ControlClient, "cluster", old_daemon)

    async def scenario() -> None:
        app = PolarKVApp(d.control_socket, interval=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("4")
            await until(pilot, lambda: "Not in a cluster" in screen_text(app), what="the standalone panel")
            assert "does not know the `cluster` control op" in " ".join(screen_text(app).split())
            n = len(asked)
            stats_at = app.view.updated
            await until(pilot, lambda: app.view.updated > stats_at + 0.5, what="more polls")  # 3 or more
            assert len(asked) == n == 1  # asked once, not at every poll
            assert "● connected" in screen_text(app)

    _run(scenario())

"""`where` in a cluster of real daemons: per member, how many leading tokens of a prompt it holds,
from the meta map's records (the queried member's own pages under `here`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.test_daemons import Cluster
from tests.conftest import TEST_NS, chain_tokens, store_chain, wait_for

pytestmark = pytest.mark.cluster

PT = TEST_NS.page_tokens


@pytest.fixture
def cluster(daemon_factory, tmp_path: Path) -> Cluster:
    return Cluster.keyed(daemon_factory, tmp_path)


def test_where_names_each_member_and_its_prefix(cluster: Cluster) -> None:
    a, b, c = (cluster.add(n) for n in "abc")
    cluster.wait_converged(["a", "b", "c"])
    tokens = chain_tokens(3, 12)
    with a.engine() as kv:
        store_chain(kv, tokens)  # all 12 pages
    with b.engine() as kv:
        store_chain(kv, tokens[: 5 * PT])  # the first 5
    with c.engine() as kv, c.control() as ctl:  # c holds the first 2 and asks
        store_chain(kv, tokens[: 2 * PT])
        query = {"namespace": kv.ns_digest.hex(), "tokens": tokens}
        out = wait_for(
            lambda: (r := ctl.where(query))["cluster"] == {"a": 12 * PT, "b": 5 * PT} and r,
            15,
            "the meta map to know a's and b's pages",
        )
        assert out["node"] == "c"
        assert out["here"] == {"tokens": 2 * PT, "l1": 0, "dram": 2 * PT, "disk": 0}
        # a prompt that diverges after page 3: a and b hold 3 pages of it
        other = tokens[: 3 * PT] + chain_tokens(4, 2)
        assert ctl.where({**query, "tokens": other})["cluster"] == {"a": 3 * PT, "b": 3 * PT}
    # b leaves: its pages are no longer anyone's answer
    b.stop()
    with c.engine() as kv, c.control() as ctl:
        wait_for(lambda: ctl.where(query)["cluster"] == {"a": 12 * PT}, 20, "b's records to be dropped")

"""The cluster: SWIM membership (`membership`), its transports (`gossip`) and the simulator (`sim`).

Still to come (see docs/CLUSTER.md): daemon integration, the meta map, the DMP and page transport.
"""

from polarkvd.cluster.membership import (
    ClusterConfig,
    Event,
    EventKind,
    Member,
    Membership,
    State,
)

__all__ = ["ClusterConfig", "Event", "EventKind", "Member", "Membership", "State"]

"""The snapshot policy's interval: the most frequent snapshots the traffic budget allows,
never rarer than the rebuild target allows."""

from service.sessions.policy import Measured, SnapshotPolicy


def test_interval_keeps_to_the_traffic_budget_within_the_rebuild_target():
    policy = SnapshotPolicy(rebuild_target=10, traffic=10)
    # Nothing measured yet: the rebuild target alone.
    assert policy.interval(Measured()) == 10
    # A 63 MB snapshot of a session moving 0.81 MB a chunk: every 8 chunks keeps it under 10x.
    decode = Measured(chunk_s=1.0, chunk_bytes=810_000, snapshot_s=0.5, snapshot_bytes=63_000_000)
    assert policy.interval(decode) == 8
    # A smaller snapshot is taken more often; never more often than every chunk.
    assert policy.interval(Measured(chunk_s=1.0, chunk_bytes=810_000, snapshot_s=0.5, snapshot_bytes=26_000_000)) == 4
    assert policy.interval(Measured(chunk_s=1.0, chunk_bytes=810_000, snapshot_bytes=1000)) == 1
    # A snapshot so large that the budget would need 13 chunks: the rebuild target wins.
    assert policy.interval(Measured(chunk_s=1.0, chunk_bytes=810_000, snapshot_s=0.5,
                                    snapshot_bytes=100_000_000)) == 9
    # A snapshot that costs 3 chunk computes to restore leaves 7 chunks to replay.
    assert policy.interval(Measured(chunk_s=1.0, chunk_bytes=1, snapshot_s=3.0, snapshot_bytes=10**12)) == 7
    assert policy.interval(Measured(chunk_s=1.0, chunk_bytes=1, snapshot_s=30.0, snapshot_bytes=10**12)) == 1


def test_due_counts_from_the_latest_snapshot_known_here():
    policy = SnapshotPolicy(rebuild_target=4, traffic=10)
    assert [label for label in range(10) if policy.due("s", label)] == [3, 4, 5, 6, 7, 8, 9]
    policy.of("s").label = 5
    assert [label for label in range(6, 12) if policy.due("s", label)] == [9, 10, 11]
    policy.forget("s")
    assert policy.due("s", 3) == 4

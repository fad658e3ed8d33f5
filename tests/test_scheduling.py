"""Scheduling between callers: the device's job order (weighted deficit round robin over job
costs, interactive jobs first without starving bulk ones), and the service under a flood from
one key: another key's requests and session chunks are served ahead of the flood's backlog,
and each key's own limits answer its own 429s."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import pytest

from service import Settings
from service.auth import principal_of
from service.scheduling import INTERACTIVE_RUN, JobQueue
from tests.servers import SHARED_REDIS_URL, metric_sum
from tests.session_helpers import npy_bytes
from tests.test_service_app import frames, http_for, run_app

pytestmark = pytest.mark.timeout(300)


@dataclass(eq=False)
class Job:
    caller: str
    cost: float
    weight: float = 1.0
    interactive: bool = False
    abandoned: bool = False


QUANTUM = 8 * 256 * 256  # a typical job's cost: an 8-frame 256x256 chunk at one step


def drain(queue: JobQueue, count: int) -> list[Job]:
    return [queue._take() for _ in range(count)]


def served_cost(jobs: list[Job]) -> Counter:
    cost: Counter = Counter()
    for job in jobs:
        cost[job.caller] += job.cost
    return cost


def test_callers_share_the_device_by_cost_not_by_job_count():
    """A caller of cheap jobs and one of jobs 8x as costly get the same device time."""
    queue = JobQueue()
    for _ in range(400):
        queue.push(Job("cheap", QUANTUM / 4))
    for _ in range(50):
        queue.push(Job("costly", 2 * QUANTUM))
    served = served_cost(drain(queue, 200))
    assert served["cheap"] == pytest.approx(served["costly"], rel=0.05)


def test_weights_give_proportional_shares():
    queue = JobQueue()
    for _ in range(300):
        queue.push(Job("heavy", QUANTUM, weight=3))
        queue.push(Job("light", QUANTUM, weight=1))
    served = served_cost(drain(queue, 200))
    assert served["heavy"] / served["light"] == pytest.approx(3, rel=0.05)


def test_a_new_caller_goes_ahead_of_the_backlog_of_a_busy_one():
    queue = JobQueue()
    for _ in range(100):
        queue.push(Job("flood", QUANTUM))
    queue._take()  # the flood's first job runs
    queue.push(Job("newcomer", QUANTUM / 100))
    assert [job.caller for job in drain(queue, 2)] == ["newcomer", "flood"]


def test_interactive_jobs_go_first_and_bulk_still_runs():
    queue = JobQueue()
    for _ in range(50):
        queue.push(Job("bulk", QUANTUM))
    for _ in range(50):
        queue.push(Job("stream", QUANTUM / 8, interactive=True))
    order = [job.interactive for job in drain(queue, 30)]
    # Runs of INTERACTIVE_RUN interactive jobs, each followed by one bulk job.
    assert order == ([True] * INTERACTIVE_RUN + [False]) * (30 // (INTERACTIVE_RUN + 1))
    lone = JobQueue()
    lone.push(Job("stream", 1, interactive=True))
    lone.push(Job("bulk", 1))
    assert [job.interactive for job in drain(lone, 2)] == [True, False]


def test_abandoned_jobs_are_dropped_and_close_drains_then_ends():
    queue = JobQueue()
    gone = Job("a", QUANTUM, abandoned=True)
    kept = [Job("a", QUANTUM), Job("b", QUANTUM)]
    for job in (gone, *kept):
        queue.push(job)
    queue.close()

    async def take_all():
        return [await queue.get() for _ in range(3)]

    *taken, end = asyncio.run(take_all())
    assert sorted(taken, key=id) == sorted(kept, key=id) and end is None


def test_jobs_run_together_come_next_in_the_fair_order():
    """A batch takes the jobs after its first while they match: never one that another caller's
    job comes before, and only of the first job's class."""
    queue = JobQueue()
    for caller in ("a", "b", "a", "a", "c"):
        queue.push(Job(caller, QUANTUM))
    queue.push(Job("a", QUANTUM, interactive=True))
    first = queue._take()
    assert first.interactive
    assert queue.pop_while(first, lambda job: True, 8) == []  # no other interactive job
    first = queue._take()
    same_key = lambda job: job.caller in ("a", "b")  # noqa: E731
    # Fair order: a, b, c, a, a (each caller's first job, then the rest): c stops the batch.
    assert [job.caller for job in queue.pop_while(first, same_key, 8)] == ["b"]
    assert [job.caller for job in drain(queue, 3)] == ["c", "a", "a"]


# --- the service under a flood ---------------------------------------------------------------

KEY_A, KEY_B = "key-a", "key-b"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_another_keys_requests_and_session_chunks_are_served_ahead_of_a_flood(tiny_checkpoint):
    """Key A keeps 4 whole-clip encodes of 6 chunks each in flight; key B then sends one encode and
    a 3-chunk encode session. Under first-in-first-out B would wait for A's whole backlog (24
    jobs); here B's requests finish while most of A's are still running."""
    clip = npy_bytes(frames(40, 32, 32))  # 6 jobs: 5 chunks of 8 frames and the tail
    chunk = npy_bytes(frames(4, 32, 32))
    finished: list[str] = []

    async def scenario(app):
        async with http_for(app) as http:
            async def encode(key: str, label: str):
                answer = await http.post("/v1/encode", content=clip, headers={**auth(key), "content-type":
                                                                            "application/x-npy"})
                assert answer.status_code == 200, answer.text
                finished.append(label)

            async def session():
                sid = (await http.post("/v1/sessions", json={"kind": "encode"}, headers=auth(KEY_B))).json()["id"]
                for seq in range(3):
                    answer = await http.post(f"/v1/sessions/{sid}/chunks/{seq}", content=chunk, headers=auth(KEY_B))
                    assert answer.status_code == 200, answer.text
                finished.append("B session")

            flood = [asyncio.ensure_future(encode(KEY_A, f"A{i}")) for i in range(4)]
            await asyncio.sleep(0.5)  # A's backlog is queued
            await asyncio.gather(encode(KEY_B, "B clip"), session(), *flood)
            return (await http.get("/metrics")).text

    # The fair order alone: with batching, A's same-shape chunks that come next in that order run
    # as one batch (test_jobs_run_together_come_next_in_the_fair_order).
    text = run_app(Settings(checkpoint=tiny_checkpoint, api_keys=(KEY_A, KEY_B), queue_size=8, key_queue_size=4,
                            batch_max=1), scenario)
    assert len(finished) == 6
    assert finished.index("B clip") <= 2 and finished.index("B session") <= 2, finished
    waits = {key: metric_sum(text, "cdt_key_queue_wait_seconds_count", key=principal_of(key)) for key in (KEY_A, KEY_B)}
    assert waits == {KEY_A: 24, KEY_B: 6 + 3}


def test_each_key_has_its_own_queue_and_rate_limits(tiny_checkpoint):
    body = npy_bytes(frames(9, 16, 16))
    headers = {"content-type": "application/x-npy"}

    async def scenario(app):
        async with http_for(app) as http:
            post = lambda key: http.post("/v1/encode", content=body, headers={**headers, **auth(key)})  # noqa: E731
            queued = await asyncio.gather(*(post(KEY_A) for _ in range(4)))
            other = await post(KEY_B)
            rated = [await post(KEY_B) for _ in range(4)]
            text = (await http.get("/metrics")).text
        return queued, other, rated, text

    queued, other, rated, text = run_app(Settings(checkpoint=tiny_checkpoint, api_keys=(f"{KEY_A}:2", KEY_B),
                                                  key_queue_size=2, key_rate=0.01, key_burst=4), scenario)
    statuses = Counter(answer.status_code for answer in queued)
    assert statuses == {200: 2, 429: 2}
    refused = next(answer for answer in queued if answer.status_code == 429)
    assert refused.json()["error"]["code"] == "key_queue_full" and int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 200  # A at its limit; B is served
    assert [answer.status_code for answer in rated] == [200, 200, 200, 429]  # a burst of 4, then the rate
    assert rated[-1].json()["error"]["code"] == "key_rate_limited" and int(rated[-1].headers["retry-after"]) >= 1
    assert metric_sum(text, "cdt_key_rejected_total", key=principal_of(KEY_A), reason="key_queue_full") == 2
    assert metric_sum(text, "cdt_key_rejected_total", key=principal_of(KEY_B), reason="key_rate_limited") == 1


@pytest.mark.parametrize("store", ["in-process", "redis"])
def test_each_key_holds_at_most_its_live_sessions(tiny_checkpoint, redis_prefix, store):
    """Per key, in the store (so across replicas): a key at its limit gets 429 while another key
    creates sessions; a deleted or expired session frees its place."""
    redis = {"redis_url": SHARED_REDIS_URL, "session_key_prefix": redis_prefix} if store == "redis" else {}

    async def scenario(app):
        async with http_for(app) as http:
            async def create(key, ttl_s=60):
                return await http.post("/v1/sessions", json={"kind": "encode", "ttl_s": ttl_s}, headers=auth(key))

            held = [await create(KEY_A), await create(KEY_A, ttl_s=1)]
            over = await create(KEY_A)
            other = await create(KEY_B)
            await http.delete(f"/v1/sessions/{held[0].json()['id']}", headers=auth(KEY_A))
            after_delete = await create(KEY_A)
            await asyncio.sleep(1.2)  # the 1-second session expires
            after_expiry = await create(KEY_A)
            full = await create(KEY_A)
            return held, over, other, after_delete, after_expiry, full, (await http.get("/metrics")).text

    held, over, other, after_delete, after_expiry, full, text = run_app(
        Settings(checkpoint=tiny_checkpoint, api_keys=(KEY_A, KEY_B), key_max_sessions=2, **redis), scenario)
    assert [answer.status_code for answer in held] == [201, 201]
    assert over.status_code == 429 and over.json()["error"]["code"] == "key_too_many_sessions"
    assert int(over.headers["retry-after"]) >= 1
    assert other.status_code == 201
    assert after_delete.status_code == 201 and after_expiry.status_code == 201
    assert full.status_code == 429
    assert metric_sum(text, "cdt_key_rejected_total", key=principal_of(KEY_A), reason="key_too_many_sessions") == 2


def test_a_keys_weight_is_read_from_its_entry():
    settings = Settings(api_keys="alpha:2.5, beta,gamma:1")
    assert settings.keys == ("alpha", "beta", "gamma")
    assert settings.key_weights == {"alpha": 2.5, "beta": 1.0, "gamma": 1.0}
    for bad in ("alpha:0", "alpha:-1", "alpha:x", "alpha:inf"):
        with pytest.raises(ValueError, match="weight must be a positive number"):
            Settings(api_keys=bad)


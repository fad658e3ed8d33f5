"""Batching of stream pushes: several streams pushed as one batched forward give each stream
the state and answer of its own push (float rounding only: 1e-5, uint8 within one level), at
any stream positions; streams that differ in what batching needs equal are refused whole and
left unchanged. In the service, same-shape session chunks waiting together run as one batch,
answer as they would alone, and replay exactly once."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from media import StreamPush
from model import StreamingDecoder, StreamingEncoder, push_together
from service import Settings
from service.batching import Batching
from tests.servers import metric_sum
from tests.session_helpers import npy_array, npy_bytes
from tests.test_device_pool import make_pool, run
from tests.test_model_streaming import model_hash, smooth_video
from tests.test_service_app import frames, http_for, run_app
from tests.tolerance import FLOAT_ATOL, assert_float_close, assert_uint8_close

pytestmark = pytest.mark.timeout(300)

STREAMS = 3


def assert_same(alone, together, streams_alone, streams):
    """The answers agree, and so do the states: the same entries, and the same answer to one
    more chunk pushed alone (a state is judged by what it computes: its entries carry the
    network's unnormalised activations, larger than its outputs)."""
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            assert x.shape == y.shape
            if x.numel():
                assert_float_close(y, x, FLOAT_ATOL)
    for a, b in zip(streams_alone, streams):
        assert a.meta == b.meta and a.cache.layout() == b.cache.layout()
        if a.meta.get("finished"):
            continue
        probe = (torch.zeros(1, 3, 4, *a.meta["shape"][1:]) if isinstance(a, StreamingEncoder)
                 else torch.zeros(1, 16, 1, *a.meta["shape"][1:]))
        assert_float_close(copy.deepcopy(b).push(probe), copy.deepcopy(a).push(probe), FLOAT_ATOL)


@pytest.mark.exactness
def test_encode_streams_pushed_together_equal_their_own_pushes(tiny_model):
    """Ragged chunks (frames left pending between pushes) and the finish."""
    videos = [smooth_video(16, seed) for seed in range(STREAMS)]
    streams = [StreamingEncoder(tiny_model, model_hash(tiny_model)) for _ in videos]
    bounds = [(0, 3), (3, 10), (10, 16)]  # the first group and 2 pending; 2 groups and 1; 1 group and 3
    chunks = [[v[:, :, a:b] for a, b in bounds] for v in videos]
    alone_streams = copy.deepcopy(streams)
    alone = [[s.push(c) for c in cs] + [s.finish()] for s, cs in zip(alone_streams, chunks)]
    together = [push_together(streams, [cs[i] for cs in chunks]) for i in range(len(bounds))]
    together = [[*outs, s.finish()] for outs, s in zip(zip(*together), streams)]
    assert_same(alone, together, alone_streams, streams)


@pytest.mark.exactness
@pytest.mark.parametrize("steps", [1, 3])
def test_decode_streams_pushed_together_equal_their_own_pushes(tiny_model, steps):
    """Each stream draws its own noise (its seed), as when decoded alone."""
    latents = [tiny_model.encode(smooth_video(21, seed)) for seed in range(STREAMS)]  # 6 latent frames
    streams = [StreamingDecoder(tiny_model, model_hash(tiny_model), steps=steps, seed=seed) for seed in range(STREAMS)]
    chunks = [[z[:, :, :1], z[:, :, 1:3], z[:, :, 3:6]] for z in latents]
    alone_streams = copy.deepcopy(streams)
    alone = [[s.push(c) for c in cs] for s, cs in zip(alone_streams, chunks)]
    together = [push_together(streams, [cs[i] for cs in chunks]) for i in range(3)]
    assert_same(alone, [list(outs) for outs in zip(*together)], alone_streams, streams)
    assert not torch.equal(alone[0][1], alone[1][1])  # the seeds differ, so do the frames


@pytest.mark.exactness
def test_streams_at_different_positions_batch_exactly(tiny_model):
    """Decode streams 1, 2 and 4 latent frames into their videos share a state layout once past
    their first chunk: batched together, each keeps its own frame indices (its noise)."""
    z = tiny_model.encode(smooth_video(25, 0))  # 7 latent frames
    streams = []
    for done in (1, 2, 4):
        stream = StreamingDecoder(tiny_model, model_hash(tiny_model), steps=1, seed=5)
        stream.push(z[:, :, :1])
        for i in range(1, done):
            stream.push(z[:, :, i:i + 1])
        streams.append(stream)
    keys = {s.batch_key((1, 16, 2, *z.shape[3:])) for s in streams}
    assert len(keys) == 1
    alone_streams = copy.deepcopy(streams)
    alone = [s.push(z[:, :, 5:7]) for s in alone_streams]
    together = push_together(streams, [z[:, :, 5:7]] * 3)
    assert_same([alone], [together], alone_streams, streams)
    assert not torch.equal(alone[0], alone[1])  # the same latents at other positions: other noise


def test_streams_that_differ_are_refused_and_left_unchanged(tiny_model):
    """A first chunk beside a later one, a stream resumed with no history beside one that has it,
    other steps or another chunk shape: never one batch."""
    z = tiny_model.encode(smooth_video(13, 0))  # 4 latent frames
    digest = model_hash(tiny_model)

    def started(steps=1):
        stream = StreamingDecoder(tiny_model, digest, steps=steps)
        stream.push(z[:, :, :1])
        return stream

    fresh = StreamingDecoder(tiny_model, digest)
    resumed = StreamingDecoder.resume(tiny_model, digest, steps=1, seed=0, latents_done=1)
    chunk = z[:, :, 1:2]
    for pair, inputs in (((fresh, started()), [z[:, :, :1], chunk]), ((resumed, started()), [chunk, chunk]),
                         ((started(3), started()), [chunk, chunk]), ((started(), started()), [chunk, z[:, :, 1:3]])):
        before = [copy.deepcopy(s) for s in pair]
        with pytest.raises(ValueError, match="batch_key"):
            push_together(list(pair), inputs)
        for a, b in zip(before, pair):
            assert a.meta == b.meta and a.cache.equals(b.cache)


# --- in the service ---------------------------------------------------------------------------

SESSIONS = 4


def session_outputs(checkpoint, batch_max: int):
    """SESSIONS decode sessions and SESSIONS encode sessions: each one's first chunk alone, then
    two more chunks sent by all sessions of a kind at once; every answer, a replayed chunk's
    answer, the metrics, and each session's chunk time as the snapshot policy holds it after the
    first chunk and at the end."""
    latents = [npy_bytes(torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(i)).numpy())
               for i in range(SESSIONS)]
    clips = [frames(12, 32, 32, seed=i) for i in range(SESSIONS)]

    async def scenario(app):
        async with http_for(app) as http:
            async def create(kind, **spec):
                answer = await http.post("/v1/sessions", json={"kind": kind, **spec})
                assert answer.status_code == 201, answer.text
                return answer.json()["id"]

            async def push(sid, seq, body, fmt):
                answer = await http.post(f"/v1/sessions/{sid}/chunks/{seq}?format={fmt}", content=body)
                assert answer.status_code == 200, answer.text
                return answer.content

            decodes = [await create("decode", steps=1, seed=i) for i in range(SESSIONS)]
            encodes = [await create("encode") for _ in range(SESSIONS)]
            out = {sid: [await push(sid, 0, latents[i], "npy")] for i, sid in enumerate(decodes)}
            out |= {sid: [await push(sid, 0, npy_bytes(clips[i][:4]), "npy")] for i, sid in enumerate(encodes)}
            policy = app.state.sessions.snapshots.policy
            first_times = [policy.of(sid).chunk_s for sid in out]
            for seq in (1, 2):  # one kind at a time: a batch is a run of one key in the fair order
                answers = await asyncio.gather(*(push(sid, seq, latents[i], "npy") for i, sid in enumerate(decodes)))
                answers += await asyncio.gather(*(push(sid, seq, npy_bytes(clips[i][4 * seq:4 * seq + 4]), "npy")
                                                  for i, sid in enumerate(encodes)))
                for sid, answer in zip(decodes + encodes, answers):
                    out[sid].append(answer)
            replayed = await push(decodes[0], 2, latents[0], "npy")
            times = list(zip(first_times, (policy.of(sid).chunk_s for sid in out)))
            return list(out.values()), replayed, (await http.get("/metrics")).text, times

    return run_app(Settings(checkpoint=checkpoint, batch_max=batch_max, batch_wait_ms=300), scenario)


def test_session_chunks_waiting_together_run_as_one_batch_and_answer_as_alone(tiny_checkpoint):
    alone, _, alone_metrics, alone_times = session_outputs(tiny_checkpoint, batch_max=1)
    together, replayed, metrics, batched_times = session_outputs(tiny_checkpoint, batch_max=SESSIONS)
    for op in ("session_decode", "session_encode"):
        # Each session's first chunk opens its stream alone; the next two run in batches of 4.
        assert metric_sum(metrics, "cdt_batch_size_count", op=op) == SESSIONS + 2
        assert metric_sum(metrics, "cdt_batch_size_sum", op=op) == SESSIONS + 2 * SESSIONS
        assert metric_sum(alone_metrics, "cdt_batch_size_sum", op=op) == 3 * SESSIONS
    for a, b in zip(alone[:SESSIONS], together[:SESSIONS]):  # decode: uint8 frames
        for x, y in zip(a, b):
            assert_uint8_close(npy_array(y), npy_array(x))
    for a, b in zip(alone[SESSIONS:], together[SESSIONS:]):  # encode: latents
        for x, y in zip(a, b):
            assert_float_close(npy_array(y), npy_array(x))
    assert replayed == together[0][2]  # the stored answer, not a second push
    # The snapshot policy's chunk time is measured on every chunk run alone, on none run batched.
    assert all(0 < first != last for first, last in alone_times), alone_times
    assert all(0 < first == last for first, last in batched_times), batched_times


def test_a_push_abandoned_while_its_batch_waits_for_more_never_runs(served):
    """The batch wait is a wait in the queue: a caller gone by its end costs no compute."""
    prepared = []
    video = smooth_video(5)

    def push() -> StreamPush:
        stream = StreamingEncoder(served.model, served.identity.content_hash)
        return StreamPush(stream, lambda: prepared.append(1) or video, lambda out: tuple(out.shape), tuple(video.shape))

    async def scenario():
        pool = make_pool(served, queue_size=4, timeout_s=30, memory_bytes=2**40, batching=Batching(4, wait_s=0.5))
        pool.start()
        gone = asyncio.ensure_future(run(pool, "encode", push()))
        await asyncio.sleep(0.1)  # taken by the worker, which now waits for more pushes like it
        gone.cancel()
        answered = await run(pool, "encode", push())  # the worker goes on
        await pool.stop()
        return answered

    assert asyncio.run(scenario()) == (1, 16, 2, video.shape[3] // 8, video.shape[4] // 8) and prepared == [1]

"""Streaming sessions: a long video (or latent sequence) in successive chunk requests.

Session state lives in tiers:

- hot: the live stream (StreamingEncoder/StreamingDecoder and its FeatureCache) stays in the
  memory of the replica that computed it (`hot`, LRU under CDT_SESSION_HOT_MB), tagged with
  the store version it corresponds to;
- store (`store`): the typed record (`record`), the last response, and an input log: each
  chunk's body as received, kept while it is needed to cover the model's receptive field
  (`window`); optionally a FeatureCache snapshot, written off the response path (`snapshots`).

The modules, one job each:

- `protocol`: what the routes take and answer (SessionSpec, SessionInfo, ChunkResult);
- `record`: the stored record (SessionRecord, Counters, LogEntry, LastResponse);
- `window`: positions in the input log, and the window a replay needs;
- `kinds`: what differs between encode and decode sessions, behind one interface;
- `hot`: the hot streams of this replica;
- `rebuild`: rebuilding a stream from a snapshot or the log;
- `snapshots`: writing snapshots;
- `metrics`: the sessions' Prometheus metrics;
- `store`: the store interface and its memory and Redis backends;
- `service`: the session service the routes call (create, get, delete, push, finish).
"""

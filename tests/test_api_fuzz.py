"""The HTTP API under property-based fuzzing (tests/api_fuzz.py): schemathesis against a real
`cdt serve` on Redis, with the valid key, a wrong key and no key, from the server's /openapi.json."""

from __future__ import annotations

import pytest

from model import DEFAULT_CHECKPOINT
from tests.api_fuzz import fuzz_api

MIN_CASES = 1000
PROBES = {"GET /healthz", "GET /readyz", "GET /metrics"}
OPERATIONS = {"GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/models", "POST /v1/encode", "POST /v1/frames",
              "POST /v1/decode", "POST /v1/diffusers/decode", "POST /v1/diffusers/encode",
              "POST /v1/sessions", "GET /v1/sessions/{session_id}", "DELETE /v1/sessions/{session_id}",
              "POST /v1/sessions/{session_id}/chunks/{seq}", "POST /v1/sessions/{session_id}/finish"}


@pytest.fixture(scope="module")
def fuzzed(shared_videos, tmp_path_factory) -> dict:
    # The full run, all phases with every key, is `python -m benchmarks.api_fuzz`.
    return fuzz_api(DEFAULT_CHECKPOINT, shared_videos, tmp_path_factory.mktemp("fuzz"), refusals_in_brief=True)


def test_fuzzing_reaches_every_operation_with_and_without_keys(fuzzed):
    assert fuzzed["cases"] >= MIN_CASES
    for auth in ("valid key", "wrong key", "no key"):
        assert {row["operation"] for row in fuzzed["rows"] if row["auth"] == auth} == OPERATIONS
    # The valid key's cases get past the codecs into the model, and the others stop at auth.
    # (Session chunks reach the model only in stateful chains that keep seq in order, a few
    # per run or none, depending on the draw; tests/test_sessions*.py cover them.)
    ok = {row["operation"] for row in fuzzed["rows"] if row["auth"] == "valid key" and 200 in row["statuses"]}
    assert {"POST /v1/encode", "POST /v1/frames", "POST /v1/decode", "POST /v1/diffusers/decode",
            "POST /v1/diffusers/encode"} <= ok
    # Without a valid key nothing but the probes answers, beyond a body that does not parse
    # (read before auth) and a method a path does not have.
    refused = {"missing_api_key", "invalid_api_key", "bad_parameter", "method_not_allowed"}
    for row in fuzzed["rows"]:
        if row["auth"] != "valid key" and row["operation"] not in PROBES:
            assert min(row["statuses"]) >= 400 and set(row["error_codes"]) <= refused, row


def test_no_server_error_and_every_check_passes(fuzzed):
    assert fuzzed["server_errors"] == 0, fuzzed["rows"]
    assert fuzzed["check_failures"] == [], fuzzed["failed"]


def test_server_alive_and_encoding_correctly_afterwards(fuzzed):
    assert fuzzed["alive_after"]
    assert fuzzed["encode_after"]

"""The pure parts of the client: the incremental event-stream decoder, the
error class chosen for each API error code, and time parsing."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

import stacyvm
from stacyvm._core import SSEDecoder, SSEEvent, exec_item, mode_str, shell_cmd
from stacyvm.errors import ERROR_CLASSES, error_from_response
from stacyvm.models import ExecChunk, ExecExit, parse_time

STREAM = (
    b'event: stdout\ndata: {"data":"a\\n"}\n\n'
    b": keep-alive\n\n"
    b'event: stderr\r\ndata: {"data":"\xef\xbf\xbd","data_b64":"/w=="}\r\n\r\n'
    b'event: exit\rdata: {"exit_code":0,"signal":null,"duration_ms":5,"timed_out":false}\r\r'
)
EXPECTED = [
    SSEEvent("stdout", '{"data":"a\\n"}'),
    SSEEvent("stderr", '{"data":"\ufffd","data_b64":"/w=="}'),
    SSEEvent("exit", '{"exit_code":0,"signal":null,"duration_ms":5,"timed_out":false}'),
]


@pytest.mark.parametrize("piece", [1, 2, 3, 7, len(STREAM)])
def test_sse_decoder_is_indifferent_to_how_bytes_arrive(piece: int) -> None:
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(STREAM), piece):
        events.extend(decoder.feed(STREAM[i : i + piece]))
    assert events == EXPECTED


def test_sse_decoder_joins_data_lines_and_keeps_partial_events() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\ndata:two\n") == []
    assert decoder.feed(b"\n") == [SSEEvent("message", "one\ntwo")]


def test_exec_events_become_chunks_exit_or_errors() -> None:
    chunk = exec_item(EXPECTED[1])
    assert chunk == ExecChunk(stream="stderr", data=b"\xff", text="\ufffd")
    assert exec_item(EXPECTED[2]) == ExecExit(exit_code=0, signal=None, duration_ms=5, timed_out=False)
    with pytest.raises(stacyvm.ProviderUnavailable) as err:
        exec_item(SSEEvent("error", '{"code":"provider_unavailable","message":"agent gone"}'))
    assert err.value.message == "agent gone" and err.value.status is None
    assert exec_item(SSEEvent("unknown", "{}")) is None


@pytest.mark.parametrize("code,cls", sorted(ERROR_CLASSES.items()))
def test_each_error_code_has_its_class(code: str, cls: type) -> None:
    body = ('{"error":{"code":"%s","message":"why","request_id":"req_1"}}' % code).encode()
    err = error_from_response(418, {"retry-after": "7"}, body)
    assert type(err) is cls and isinstance(err, stacyvm.StacyVMError)
    assert (err.code, err.message, err.request_id, err.status) == (code, "why", "req_1", 418)
    if cls is stacyvm.RateLimited:
        assert isinstance(err, stacyvm.RateLimited) and err.retry_after == 7.0


def test_error_without_a_json_body_falls_back_on_the_status() -> None:
    err = error_from_response(504, {"x-request-id": "req_9"}, b"upstream timed out")
    assert isinstance(err, stacyvm.Timeout)
    assert (err.message, err.request_id) == ("upstream timed out", "req_9")
    unknown = error_from_response(418, {}, b'{"error":{"code":"teapot","message":"short and stout"}}')
    assert type(unknown) is stacyvm.StacyVMError and unknown.code == "teapot"


def test_times_modes_and_commands() -> None:
    assert parse_time("2026-11-29T13:05:46.996586437Z") == datetime(2026, 11, 29, 13, 5, 46, 996586, tzinfo=timezone.utc)
    assert parse_time("2026-11-29T13:05:46Z") == datetime(2026, 11, 29, 13, 5, 46, tzinfo=timezone.utc)
    assert parse_time(None) is None
    assert mode_str(0o755) == "0755" and mode_str("0600") == "0600"
    with pytest.raises(ValueError):
        mode_str(0o17777)
    assert shell_cmd("echo hi") == ["sh", "-c", "echo hi"]
    assert shell_cmd(("ls", "/")) == ["ls", "/"]
    with pytest.raises(ValueError):
        shell_cmd([])


def test_an_allow_list_becomes_the_network_object() -> None:
    from stacyvm import _core

    common = dict(
        image="busybox", template=None, provider=None, cpu=None, memory_mb=None, timeout_s=None,
        env=None, labels=None, workdir=None, idempotency_key=None, request_timeout=None,
    )
    call = _core.sandbox_create(network=None, allow=["10.0.0.0/8", "pypi.org"], **common)
    assert call.json["network"] == {"allow": ["10.0.0.0/8", "pypi.org"]}
    assert _core.sandbox_create(network="egress", **common).json["network"] == "egress"
    with pytest.raises(ValueError):
        _core.sandbox_create(network="none", allow=["pypi.org"], **common)
    assert stacyvm.Network.FULL == "full" and "none" in stacyvm.Network.VALUES

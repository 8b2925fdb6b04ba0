"""Each response leaves in one write: uvicorn's protocol fed bytes over a transport that
records what the server sends, and gunicorn's socket wrapper over a recording socket.
Both servers also answer every real-socket test in test_serving_http.py this way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.server import ServerState

from torchship.serving.gunicorn_worker import OneWriteSocket
from torchship.serving.one_write import CoalescingTransport, OneWriteHttpProtocol


class RecordingTransport(asyncio.Transport):
    """The socket side: every ``write`` the server makes, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.closed_by_server = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.writes.append(b"".join(list_of_data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _json(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"got": len(body)})


async def _stream(request: Request) -> Response:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part
            await asyncio.sleep(0.01)  # later turns of the loop

    return StreamingResponse(parts(), media_type="text/plain")


async def _big(request: Request) -> Response:
    return Response(b"x" * (1024 * 1024), media_type="application/octet-stream")


APP = Starlette(
    routes=[
        Route("/json", _json, methods=["POST"]),
        Route("/stream", _stream),
        Route("/big", _big),
    ]
)


async def _exchange(raw: bytes, *, until: bytes, settle_s: float = 0.05) -> RecordingTransport:
    config = uvicorn.Config(APP, http=OneWriteHttpProtocol, log_config=None, ws="none")
    config.load()
    protocol = OneWriteHttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(raw)
    for _ in range(200):
        if b"".join(transport.writes).count(until) >= raw.count(b"HTTP/1.1\r\n"):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(settle_s)
    transport.closed_by_server = transport.closed
    protocol.connection_lost(None)
    return transport


def _post(path: str, body: bytes, *extra: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"host: t", b"content-length: %d" % len(body)]
    return b"\r\n".join([*head, *extra, b"", b""]) + body


def test_a_response_leaves_in_one_write() -> None:
    transport = asyncio.run(_exchange(_post("/json", b"abc"), until=b'{"got":3}'))
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 9" in head
    assert body == b'{"got":3}'
    assert not transport.closed_by_server  # keep-alive


def test_pipelined_requests_each_get_a_whole_answer() -> None:
    raw = _post("/json", b"a") + _post("/json", b"bb")
    transport = asyncio.run(_exchange(raw, until=b'{"got":'))
    sent = b"".join(transport.writes)
    assert sent.count(b"HTTP/1.1 200 OK") == 2
    assert sent.index(b'{"got":1}') < sent.index(b'{"got":2}')


def test_connection_close_sends_the_answer_before_closing() -> None:
    transport = asyncio.run(_exchange(_post("/json", b"abc", b"connection: close"), until=b"}"))
    assert transport.closed_by_server and not transport.aborted
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b'{"got":3}')


def test_a_streamed_body_goes_out_as_it_is_made() -> None:
    raw = b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n"
    transport = asyncio.run(_exchange(raw, until=b"0\r\n\r\n"))
    assert len(transport.writes) >= 3  # the parts were awaited apart: not held back
    sent = b"".join(transport.writes)
    assert sent.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in sent
    assert sent.endswith(b"5\r\nthree\r\n0\r\n\r\n")


def test_a_big_body_is_sent_whole() -> None:
    raw = b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n"
    transport = asyncio.run(_exchange(raw, until=b"x" * 1024 * 1024))
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"\r\n\r\n" + b"x" * 1024 * 1024)


def test_a_body_written_without_awaiting_is_not_gathered_whole() -> None:
    async def scenario() -> RecordingTransport:
        real = RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())
        for _ in range(64):  # 4 MiB in one loop turn
            transport.write(b"y" * 65536)
        assert real.writes and transport.get_write_buffer_size() < 512 * 1024
        await asyncio.sleep(0)
        return real

    real = asyncio.run(scenario())
    assert b"".join(real.writes) == b"y" * (64 * 65536)


@pytest.mark.parametrize("end", ["close", "abort", "peer gone"])
def test_held_bytes_and_the_end_of_a_connection(end: str) -> None:
    async def scenario() -> RecordingTransport:
        real = RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())
        transport.write(b"head ")
        transport.write(memoryview(b"body"))
        assert transport.get_write_buffer_size() == 9
        if end == "close":
            transport.close()
        elif end == "abort":
            transport.abort()
        else:
            real.closed = True
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return real

    real = asyncio.run(scenario())
    assert real.writes == ([b"head body"] if end == "close" else [])
    assert real.closed


# --- gunicorn (Flask) -------------------------------------------------------------------


class RecordingSocket:
    """What gunicorn's response writes to: every ``sendall``, and other calls by name."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.calls: list[str] = []

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(bytes(data))

    def fileno(self) -> int:
        self.calls.append("fileno")
        return 99


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"


def test_gunicorn_headers_and_body_leave_in_one_send() -> None:
    sock = RecordingSocket()
    one = OneWriteSocket(sock)
    one.sendall(HEAD)
    assert sock.sent == []  # held for the body
    one.sendall(b"body")
    one.sendall(b"more")  # later writes go straight through
    one.flush()
    assert sock.sent == [HEAD + b"body", b"more"]


def test_gunicorn_a_body_less_answer_is_sent_at_the_end() -> None:
    sock = RecordingSocket()
    one = OneWriteSocket(sock)
    one.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    one.flush()
    one.flush()
    assert sock.sent == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_gunicorn_other_socket_use_sends_the_held_head_first() -> None:
    sock = RecordingSocket()
    one = OneWriteSocket(sock)
    one.sendall(HEAD)
    assert one.fileno() == 99  # sendfile() of a file body asks for it: headers go first
    assert sock.sent == [HEAD] and sock.calls == ["fileno"]


def test_gunicorn_a_big_body_follows_the_head_without_a_copy() -> None:
    sock = RecordingSocket()
    one = OneWriteSocket(sock)
    big = b"x" * (1024 * 1024)
    one.sendall(HEAD)
    one.sendall(big)
    assert sock.sent == [HEAD, big]

"""A scriptable OAuth endpoint on a real loopback socket (aiohttp): each path answers the
answers queued for it, in order (the last one repeats), and records every request as it
arrived (method, path, headers, body). The provider client under test talks real HTTP
to it; what the fake saw is what a provider would have seen."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, http_status: int = 200, /, **members: Any) -> Answer:
        return cls(http_status, json.dumps(members).encode())


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode()))

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeOAuth:
    base: str = ""
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def script(self, path: str, *answers: Answer) -> None:
        self.answers[path] = list(answers)

    def requests(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.seen.append(Seen(request.method, request.path,
                              {k.lower(): v for k, v in request.headers.items()}, raw))
        queue = self.answers.get(request.path) or [Answer(404, b"")]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        headers = {"Content-Type": answer.content_type} if answer.content_type else {}
        headers.update(answer.headers)
        return web.Response(status=answer.status, body=answer.body, headers=headers)


async def serve() -> AsyncIterator[FakeOAuth]:
    """Run a :class:`FakeOAuth` on 127.0.0.1 (an ephemeral port) until the generator ends."""
    fake = FakeOAuth()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    fake.base = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()

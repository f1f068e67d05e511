"""A TLS-terminating reverse proxy for tests: what stands in front of credproxy's admin
server when ``public_url`` is https (an ingress). Every request is forwarded as is to
``--backend`` (plain HTTP) and the answer returned as is (status, headers, body)::

    python -m devstack.ingress --backend http://127.0.0.1:9090 --cert C --key K \\
        --ready-file ready.json
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx2
from flask import Flask, Response, request

from devstack._serve import add_server_args, configure_logging, serve

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length",
        "host", "proxy-connection"}


def create_app(backend: str) -> Flask:
    app = Flask("devstack.ingress")
    client = httpx2.Client(base_url=backend.rstrip("/"), timeout=30, trust_env=False)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "HEAD", "PUT", "DELETE"])
    @app.route("/<path:path>", methods=["GET", "POST", "HEAD", "PUT", "DELETE"])
    def forward(path: str) -> Any:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["X-Forwarded-Proto"] = "https"
        target = "/" + path + (f"?{request.query_string.decode()}"
                               if request.query_string else "")
        answer = client.request(request.method, target, headers=headers,
                                content=request.get_data())
        out = Response(answer.content, status=answer.status_code)
        for k, v in answer.headers.multi_items():
            if k.lower() not in _HOP:
                out.headers.add(k, v)
        return out

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.ingress",
                                     description=__doc__.split("\n")[0])
    add_server_args(parser)
    parser.add_argument("--backend", required=True, help="http://host:port to forward to")
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    serve(create_app(args.backend), args, "ingress")


if __name__ == "__main__":
    main()

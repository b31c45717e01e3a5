"""The operations page (docs/ops-page.md): a read-only web view of the store the reference consumer
writes. Starlette serves one static page (pilehost/ops_static/) and three JSON answers it polls;
uvicorn runs it. The store is opened read-only (pilehost/ops_queries.py) and only GET and HEAD
exist: nothing here can write.

Its command line, with the usage: tools/ops_web.py.
"""
import argparse
import os
import sys
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from .ops_queries import BadQuery, OpsQueries, StoreUnavailable, open_reader

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops_static")
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/ops.js": ("ops.js", "text/javascript"),
         "/ops.css": ("ops.css", "text/css"), "/favicon.svg": ("favicon.svg", "image/svg+xml")}
REFRESH_S = 2.0  # how often the page asks again
# The page loads nothing from elsewhere and runs no inline script: field data that slipped
# through as markup could not run even if the page's own escaping failed.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                 b"connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class ReadOnly:
    """ASGI middleware: GET and HEAD only (405 for anything else, before any route runs), and
    the security headers on every answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD"):
            return await PlainTextResponse("read-only", status_code=405,
                                           headers={"allow": "GET, HEAD"})(scope, receive, self._send(send))
        await self.app(scope, receive, self._send(send))

    @staticmethod
    def _send(send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + SECURITY_HEADERS)
            await send(message)
        return with_headers


def make_app(queries, refresh_s=REFRESH_S, title="Pile operations"):
    """The Starlette application over an OpsQueries."""

    def answer(fn):
        def endpoint(request):  # sync: Starlette runs it in its thread pool (the drivers block)
            try:
                return JSONResponse(fn(request.query_params))
            except BadQuery as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            except StoreUnavailable as e:
                return JSONResponse({"error": "the store cannot be read: %s" % e}, status_code=503)
        return endpoint

    def pile(params):
        found = queries.pile(params.get("id", ""))
        return found if found is not None else {"now": queries._now(), "pile": None}

    def config(params):
        return dict(queries.choices(), refresh_s=refresh_s, title=title, store=queries.reader.text)

    def static(request):
        name, media = FILES[request.url.path]
        return FileResponse(os.path.join(STATIC, name), media_type=media)

    params = ("pile", "since", "until", "stop_reason", "auth_source", "limit", "offset")
    routes = [Route(path, static, methods=["GET"]) for path in FILES]
    routes += [
        Route("/api/config", answer(config), methods=["GET"]),
        Route("/api/fleet", answer(lambda p: queries.fleet(p.get("q", ""), p.get("state", ""),
                                                           p.get("limit"))), methods=["GET"]),
        Route("/api/pile", answer(pile), methods=["GET"]),
        Route("/api/sessions", answer(lambda p: queries.sessions(**{k: p.get(k, "") for k in params})),
              methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(ReadOnly)])


class Server:
    """The page on host:port in a thread of this process (tests, tools); `url`, `stop()`.
    port 0: a free one."""

    def __init__(self, db_url, host="127.0.0.1", port=0, refresh_s=REFRESH_S):
        self.reader = open_reader(db_url)
        self.queries = OpsQueries(self.reader)
        config = uvicorn.Config(make_app(self.queries, refresh_s), host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ops-web", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise OSError("the operations page could not start on %s:%d" % (host, port))
            self.thread.join(0.05)
        sock = self.server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.url = "http://%s:%d/" % (self.host, self.port)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.reader.close()


def main(argv=None):
    p = argparse.ArgumentParser(description="The operations page: a read-only web view of the consumer's "
                                "store (docs/ops-page.md).")
    p.add_argument("--db", default="sqlite:///evse-telemetry.db",
                   help="the consumer's --db: sqlite:///path.db (default sqlite:///evse-telemetry.db) "
                   "or postgresql://...")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--refresh", type=float, default=REFRESH_S, help="seconds between updates (default 2)")
    args = p.parse_args(argv)
    if args.db.startswith("sqlite:///") and not os.path.exists(args.db[len("sqlite:///"):]):
        print("ops_web: %s does not exist: start the consumer on it first" % args.db, file=sys.stderr)
        return 2
    try:
        reader = open_reader(args.db)
    except (ValueError, ImportError) as e:
        print("ops_web: %s" % e, file=sys.stderr)
        return 2
    queries = OpsQueries(reader)
    print("ops_web: %s on http://%s:%d/ (read-only)" % (reader.text, args.host, args.port), flush=True)
    uvicorn.run(make_app(queries, args.refresh), host=args.host, port=args.port, log_level="warning",
                lifespan="off")
    reader.close()
    return 0

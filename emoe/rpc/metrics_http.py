"""The Prometheus endpoint (``--metrics-port``): the service's registry over HTTP(S).

It binds ``127.0.0.1`` unless told otherwise (``--metrics-host``). With TLS configured for the
service it serves HTTPS with the same certificate; with a token file it answers only scrapes
that carry an admin token (``Authorization: Bearer <token>``): 401 without a valid token, 403
for a token that is not an admin's. Each scrape runs on a thread of its own.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from emoe.core.errors import ConfigError
from emoe.rpc.auth import TokenTable

log = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingWSGIServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # a scrape that breaks off, or plain HTTP sent to the HTTPS port
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


def _guarded(app, auth: TokenTable):
    def guarded(environ, start_response):
        identity = auth.identify(environ.get("HTTP_AUTHORIZATION"))
        if identity is None or not identity.admin:
            status = "401 Unauthorized" if identity is None else "403 Forbidden"
            start_response(status, [("Content-Type", "text/plain"),
                                    ("WWW-Authenticate", 'Bearer realm="emoe metrics"')])
            return [b"an admin bearer token is required\n"]
        return app(environ, start_response)

    return guarded


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0,
                 auth: TokenTable | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None):
        app = make_wsgi_app(registry)
        if auth is not None:
            app = _guarded(app, auth)
        try:
            self._httpd = make_server(host, port, app, _Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"--metrics-port: cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}") from None
        if tls_cert is not None and tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(str(tls_cert), str(tls_key))
            except (OSError, ssl.SSLError) as exc:
                self._httpd.server_close()
                raise ConfigError(f"--tls-cert/--tls-key: cannot load {tls_cert} and {tls_key}: "
                                  f"{exc}") from None
            # the handshake runs on the scrape's own thread, not the accepting one
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="emoe-metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

"""OHIF Viewer served on loopback, same origin as Orthanc's DICOMweb, for the browser tests.

The viewer is the npm package ``@ohif/app`` at the version pinned in
``tests/viewer/package.json`` (its prebuilt ``dist/``, installed by ``npm ci`` in
``scripts/test``). One small HTTP server serves ``dist/`` (every unknown path falls
back to ``index.html``, as OHIF's router expects), an ``app-config.js`` that points the
viewer at ``/dicom-web``, and forwards ``/dicom-web/...`` to Orthanc's DICOMweb plugin.
Same origin means no CORS, and the cross-origin isolation headers (COOP/COEP) are set
on every answer so that the viewer gets ``SharedArrayBuffer`` for its volume loaders.
"""

from __future__ import annotations

import http.client
import mimetypes
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VIEWER_DIR = Path(__file__).resolve().parent
DIST = VIEWER_DIR / "node_modules" / "@ohif" / "app" / "dist"

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test)',
      name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""

_ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin",
              "Cross-Origin-Embedder-Policy": "require-corp",
              "Cross-Origin-Resource-Policy": "same-origin"}
_FORWARDED_REQUEST = ("accept", "range", "content-type", "content-length", "host")
_FORWARDED_ANSWER = ("content-type", "content-length", "content-range", "etag")


def viewer_version() -> str:
    """The installed OHIF version (from its package.json), or raise if not installed."""
    import json

    manifest = DIST.parent / "package.json"
    if not manifest.is_file():
        raise RuntimeError(f"OHIF is not installed: run `npm ci --ignore-scripts` in {VIEWER_DIR}")
    return str(json.loads(manifest.read_text())["version"])


def _handler(dicomweb: str) -> type[BaseHTTPRequestHandler]:
    upstream = urllib.parse.urlsplit(dicomweb)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return  # the test prints what it needs

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith("/dicom-web/") or path == "/dicom-web":
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, APP_CONFIG.encode(), "application/javascript")
            else:
                self._static(path)

        do_POST = do_GET  # noqa: N815 - STOW-RS and QIDO POSTs go through the proxy too

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in _ISOLATION.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _static(self, path: str) -> None:
            target = (DIST / urllib.parse.unquote(path).lstrip("/")).resolve()
            if not target.is_relative_to(DIST) or not target.is_file():
                target = DIST / "index.html"  # the viewer's router owns every other path
            content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if target.suffix == ".wasm":
                content_type = "application/wasm"
            self._send(200, target.read_bytes(), content_type)

        def _proxy(self) -> None:
            body = None
            if "content-length" in self.headers:
                body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED_REQUEST}
            rest = self.path[len("/dicom-web"):]
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
            try:
                conn.request(self.command, upstream.path + rest, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() in _FORWARDED_ANSWER and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                for key, value in _ISOLATION.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            finally:
                conn.close()

    return Handler


@contextmanager
def serve_viewer(dicomweb: str) -> Iterator[str]:
    """Serve OHIF on a free 127.0.0.1 port with ``/dicom-web`` forwarded to ``dicomweb``.

    Yields the viewer's base URL (``http://127.0.0.1:PORT``).
    """
    viewer_version()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(dicomweb))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="ohif-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


#: Debian's Chromium, headless, with nothing that reaches out of the machine.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]

#: The cornerstone viewport on screen, its canvas and its canvas-to-world transform
#: (three points: the canvas origin and one CSS pixel along x and along y).
VIEWPORT_STATE = """() => {
  const engine = cornerstone.getRenderingEngines()[0];
  const vp = engine.getViewports()[0];
  const rect = vp.canvas.getBoundingClientRect();
  const imageId = vp.getCurrentImageId ? vp.getCurrentImageId() : null;
  return {id: vp.id, type: vp.type, imageId: imageId,
          box: [rect.left, rect.top, rect.width, rect.height],
          origin: vp.canvasToWorld([0, 0]), ex: vp.canvasToWorld([1, 0]),
          ey: vp.canvasToWorld([0, 1]), dpr: window.devicePixelRatio};
}"""

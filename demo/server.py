"""Serve the demo set on 127.0.0.1 (an ephemeral port) and write its url list.

`/status/<code>` answers with that HTTP status; every other path is a file under www/.
The server runs in a background thread for as long as the `serve` context is open.
"""

import csv
import functools
import http.server
import threading
from contextlib import contextmanager
from pathlib import Path


class _DemoHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # the name http.server calls
        if self.path.startswith("/status/"):
            self.send_error(int(self.path.rsplit("/", 1)[1]), "demo server error on purpose")
            return
        super().do_GET()

    def log_message(self, format, *args):  # keep img2dataset's progress bar readable
        pass


@contextmanager
def serve(www_dir):
    """Yields the base url (http://127.0.0.1:<port>) of a server for `www_dir`."""
    handler = functools.partial(_DemoHandler, directory=str(www_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_url_list(items, base_url, path):
    """The url list in CC3M's format: no header, caption<TAB>url."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        for item in items:
            writer.writerow([item.caption, f"{base_url}/{item.path}"])
    return path

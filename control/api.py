"""The control socket: a Unix stream socket speaking one JSON object per line each way.

Requests are {"cmd": NAME, ...}; replies are {"ok": true, ...} or {"ok": false, "error": TEXT}.
Only root (or the group given at start) may connect: the peer's credentials are checked with
SO_PEERCRED. A malformed, oversized or unknown request gets an error reply and the server keeps
serving; no request can raise out of the server thread.
"""

import json
import os
import socket
import struct
import threading

DEFAULT_SOCKET = "/run/lvs-dp.sock"
MAX_REQUEST = 1 << 20


class ControlServer:
    def __init__(self, path, handlers, allow_gid=None):
        self.path = path
        self.handlers = handlers            # cmd -> callable(request dict) -> reply dict
        self.allow_gid = allow_gid
        self.sock = None
        self.thread = None
        self.stopping = False

    def start(self):
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        try:
            os.unlink(self.path)            # a socket left by a crashed run
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o660 if self.allow_gid is not None else 0o600)
        if self.allow_gid is not None:
            os.chown(self.path, 0, self.allow_gid)
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.thread = threading.Thread(target=self._serve, name="control-socket", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping = True
        if self.sock:
            self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _allowed(self, conn):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        return uid == 0 or (self.allow_gid is not None and gid == self.allow_gid)

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        with conn:
            conn.settimeout(10)
            try:
                if not self._allowed(conn):
                    _send(conn, {"ok": False, "error": "permission denied: root only"})
                    return
                f = conn.makefile("rb")
                while True:
                    line = f.readline(MAX_REQUEST + 1)
                    if not line:
                        return
                    if len(line) > MAX_REQUEST:
                        _send(conn, {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"})
                        return
                    _send(conn, self.dispatch(line))
            except (OSError, ValueError):
                return

    def dispatch(self, line):
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"malformed request: {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": "malformed request: expected {\"cmd\": ...}"}
        h = self.handlers.get(req["cmd"])
        if h is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r}"}
        try:
            reply = h(req)
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:      # a handler bug must not take the daemon down
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        reply.setdefault("ok", True)
        return reply


def _send(conn, obj):
    conn.sendall(json.dumps(obj).encode() + b"\n")


def request(path, req, timeout=10):
    """Client side: send one request, return the reply dict (raises OSError if no daemon)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        _send(s, req)
        f = s.makefile("rb")
        line = f.readline()
        if not line:
            raise OSError("control socket closed without a reply")
        return json.loads(line)

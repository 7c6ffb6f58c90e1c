"""Client programs the namespace tests run inside the lab (``lab.python("client", ["-c", X, ...])``),
and the upload sink they talk to on a real server.
"""

import sys
import textwrap
import time

# argv: MiB to send, socket timeout in seconds. Sends deterministic random bytes to the VIP's
# upload service (port 9000; the sink on the real server answers "sha256 bytes client peer"),
# then prints our own sha256 and the sink's answer. The first segment is full-size, which is what
# a PROXY header or TOA must not push over the MTU.
UPLOADER = textwrap.dedent(r"""
    import hashlib, random, socket, sys
    data = random.Random(7).randbytes(int(sys.argv[1]) << 20)
    s = socket.create_connection(("172.16.1.100", 9000), timeout=float(sys.argv[2]))
    s.sendall(data)          # the first segment is full-size
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while not reply.endswith(b"\n"):
        b = s.recv(4096)
        if not b:
            break
        reply += b
    print(hashlib.sha256(data).hexdigest(), reply.decode().strip())
""")

# argv: address, path, seconds, expected size, output file. Downloads http://address/path at a
# pace that spreads `size` bytes over `seconds`, with a small receive buffer so the server cannot
# run ahead into it: the connection really lives that long (curl's --limit-rate averages, and
# with a fast path most of the file landed in the socket buffer at once). Writes the body only.
SLOW_DOWNLOAD = textwrap.dedent(r"""
    import socket, sys, time
    addr, path, seconds, size, out = sys.argv[1:6]
    seconds, size = float(seconds), int(size)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(30)
    s.connect((addr, 80))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
    head, got, t0 = b"", 0, time.monotonic()
    with open(out, "wb") as f:
        while True:
            b = s.recv(8192)
            if not b:
                break
            if head is not None:
                head += b
                if b"\r\n\r\n" not in head:
                    continue
                head, b = None, head.split(b"\r\n\r\n", 1)[1]
            f.write(b)
            f.flush()
            got += len(b)
            ahead = t0 + seconds * got / size - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    sys.exit(0 if got == size else 1)
""")

# The upload service's other end (port 9000 on a real server): for each connection, an optional
# PROXY v2 header is parsed off and the rest hashed; the answer is "sha256 bytes client peer",
# client being the header's source address or "-" without a header, peer the connection's source.
UPLOAD_SINK = textwrap.dedent(r"""
    import hashlib, socket, struct
    SIG = b"\r\n\r\n\x00\r\nQUIT\n"
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 9000)); s.listen(8)
    print("ready", flush=True)
    while True:
        c, peer = s.accept()
        c.settimeout(90)
        try:
            first = b""
            while len(first) < 16:
                b = c.recv(16 - len(first))
                if not b:
                    break
                first += b
            client = "-"
            h = hashlib.sha256(); n = 0
            if first[:12] == SIG:
                rest = struct.unpack("!H", first[14:16])[0]
                body = b""
                while len(body) < rest:
                    body += c.recv(rest - len(body))
                client = socket.inet_ntoa(body[0:4])
            else:
                h.update(first); n += len(first)
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                h.update(b); n += len(b)
            c.sendall(f"{h.hexdigest()} {n} {client} {peer[0]}\n".encode())
        except OSError:
            pass
        c.close()
""")


def start_upload_sink(lab, rs="rs3", name="upload-sink"):
    """Start UPLOAD_SINK in `rs` and wait until it listens; returns the process (lab.stop it,
    or leave it to the lab's teardown)."""
    sink = lab.popen(rs, [sys.executable, "-c", UPLOAD_SINK], name=name)
    deadline = time.monotonic() + 10
    while "ready" not in open(sink.log_path).read():
        assert time.monotonic() < deadline and sink.poll() is None, "upload sink did not start"
        time.sleep(0.1)
    return sink

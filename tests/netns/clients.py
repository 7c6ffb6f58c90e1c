"""Client programs the namespace tests run inside the lab (``lab.python("client", ["-c", X, ...])``).
"""

import textwrap

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

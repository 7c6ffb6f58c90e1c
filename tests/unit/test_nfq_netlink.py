"""nfq_netlink message parsing and building: bytes in, bytes out.

Messages are built here by hand with struct (not with the module's own encoders), and every
kernel result is compared with a naive pure-Python twin (``naive_parse`` / ``naive_verdicts``).
"""

import random
import socket
import struct

import numpy as np
import pytest

from dataplane import consts as C
from dataplane import nfq_netlink as nq

QUEUE = 7


# --- hand-built kernel messages --------------------------------------------------------------------
def _attr(atype, data):
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + b"\0" * (-len(raw) % 4)


def ipv4_udp(payload=b"hello", src="10.0.0.1", dst="10.0.0.2", sport=1234, dport=9999):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + udp


def packet_msg(pkt_id, payload, mark=None, family=socket.AF_INET, cap_len=None, extra=b"",
               queue=QUEUE, nlmsg_len=None):
    """An NFQNL_MSG_PACKET as nfqnl_build_packet_message lays it out: PACKET_HDR, optional
    attributes, MARK, CAP_LEN, PAYLOAD last."""
    body = struct.pack("=BBH", family, 0, socket.htons(queue))
    body += _attr(1, struct.pack("!IHB", pkt_id, 0x0800, 0))          # NFQA_PACKET_HDR
    body += _attr(5, struct.pack("!I", 2))                              # NFQA_IFINDEX_INDEV
    body += extra
    if mark is not None:
        body += _attr(3, struct.pack("!I", mark))                       # NFQA_MARK
    if cap_len is not None:
        body += _attr(13, struct.pack("!I", cap_len))                   # NFQA_CAP_LEN
    if payload is not None:
        body += _attr(10, payload)                                      # NFQA_PAYLOAD
    ln = 16 + len(body) if nlmsg_len is None else nlmsg_len
    hdr = struct.pack("=IHHII", ln, (3 << 8) | 0, 0, 0, 0)
    return hdr + body


def error_msg(err, seq=1):
    return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", err) + b"\0" * 16


# --- naive twins -------------------------------------------------------------------------------------
def naive_parse(data, limit=None):
    """Reference parser: [(id, mark, payload_off, payload_len, cap)], bad ids."""
    limit = len(data) if limit is None else limit
    pkts, bad = [], []
    pos = 0
    while pos + 16 <= len(data):
        ln, typ = struct.unpack_from("=IH", data, pos)
        if ln < 16:
            break
        end = min(pos + ln, len(data))
        nxt = pos + ((ln + 3) & ~3)
        if typ == 0x300:
            family = data[pos + 16]
            a, attrs = pos + 20, {}
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4 or a + alen > end:
                    break
                attrs[atype & 0x3FFF] = (a + 4, alen - 4)
                a += (alen + 3) & ~3
            if 1 in attrs:
                pid = struct.unpack_from("!I", data, attrs[1][0])[0]
                mark = struct.unpack_from("!I", data, attrs[3][0])[0] if 3 in attrs else 0
                poff, plen = attrs.get(10, (-1, 0))
                caplen = struct.unpack_from("!I", data, attrs[13][0])[0] if 13 in attrs else 0
                ok = (pos + ln <= len(data) and poff >= 0 and plen >= 20
                      and family == socket.AF_INET and caplen <= plen)
                room = min((nxt if nxt < len(data) else limit) - poff, 0xFFFF - 4)
                (pkts.append((pid, mark, poff, plen, room)) if ok else bad.append(pid))
        if pos + ln > len(data):
            break
        pos = nxt
    return pkts, bad


def naive_verdicts(data):
    """Reference decoder of verdict messages: [(type, res_id, verdict, id, payload or None)]."""
    out, pos = [], 0
    while pos < len(data):
        ln, typ, flags = struct.unpack_from("=IHH", data, pos)
        assert flags & 1 and ln >= 32 and pos + ln <= len(data)
        family, version, res_id = struct.unpack_from("!BBH", data, pos + 16)
        assert (family, version) == (0, 0)
        a, verdict, pid, payload = pos + 20, None, None, None
        while a + 4 <= pos + ln:
            alen, atype = struct.unpack_from("=HH", data, a)
            if atype == 2:
                verdict, pid = struct.unpack_from("!II", data, a + 4)
            elif atype == 10:
                payload = data[a + 4:a + alen]
            a += (alen + 3) & ~3
        out.append((typ & 0xFF, res_id, verdict, pid, payload))
        pos += (ln + 3) & ~3
    return out


def _as_tuples(p):
    return list(zip(p.pkt_id, p.mark, p.off, p.length, p.cap)), p.bad_id


# --- parsing -----------------------------------------------------------------------------------------
def test_layout_sizes():
    assert nq.NFQ_MSG_HDRLEN == 20
    assert nq.VERDICT_MSG_LEN == 32
    assert nq.NFQ_TYPE_PACKET == 0x300 and nq.NFQ_TYPE_VERDICT == 0x301
    assert nq.NFQ_TYPE_VERDICT_BATCH == 0x303


def test_parse_one_packet_id_mark_payload():
    ip = ipv4_udp(b"x" * 30)
    msg = packet_msg(0xDEADBEEF, ip, mark=0x1234)
    p = nq.parse_msgs(msg, limit=4096)
    assert p.pkt_id == [0xDEADBEEF]
    assert p.mark == [0x1234]
    assert p.length == [len(ip)]
    assert msg[p.off[0]:p.off[0] + p.length[0]] == ip
    assert p.cap == [4096 - p.off[0]]          # growth room: to the end of the slot
    assert p.bad_id == [] and p.lost == 0
    assert _as_tuples(p) == naive_parse(msg, 4096)


def test_parse_no_mark_is_zero():
    p = nq.parse_msgs(packet_msg(1, ipv4_udp()))
    assert p.mark == [0]


def test_parse_cap_is_clamped_to_nla_max():
    msg = packet_msg(1, ipv4_udp())
    p = nq.parse_msgs(msg, limit=200_000)
    assert p.cap == [nq.NFQA_PAYLOAD_MAX]


def test_parse_two_messages_in_one_datagram_cap_stops_at_next():
    m1, m2 = packet_msg(1, ipv4_udp(b"a")), packet_msg(2, ipv4_udp(b"bbbb"), mark=9)
    data = m1 + m2
    p = nq.parse_msgs(data, limit=len(data) + 100)
    assert p.pkt_id == [1, 2]
    assert p.off[0] + p.cap[0] == len(m1)       # first packet may not grow into the second
    assert p.off[1] + p.cap[1] == len(data) + 100
    assert _as_tuples(p) == naive_parse(data, len(data) + 100)


def test_parse_unknown_attributes_and_flags_bits_are_skipped():
    extra = _attr(4, b"\0" * 16) + _attr(0x8000 | 11, _attr(1, b"\0\0\0\1"))   # nested CT
    msg = packet_msg(5, ipv4_udp(), mark=3, extra=extra)
    assert _as_tuples(nq.parse_msgs(msg)) == naive_parse(msg)
    assert nq.parse_msgs(msg).pkt_id == [5]


def test_parse_truncated_by_slot_goes_to_bad_ids():
    msg = packet_msg(42, ipv4_udp(b"z" * 200))
    cut = msg[:120]
    p = nq.parse_msgs(cut, limit=120, truncated=True)
    assert p.pkt_id == [] and p.bad_id == [42]
    assert p.nlq[nq.NLQ_S_TRUNCATED] == 1
    assert naive_parse(cut) == ([], [42])


def test_parse_cap_len_means_cut_by_copy_range():
    msg = packet_msg(8, ipv4_udp(), cap_len=70000)
    p = nq.parse_msgs(msg)
    assert p.bad_id == [8] and p.nlq[nq.NLQ_S_TRUNCATED] == 1


def test_parse_no_payload_or_not_ipv4_is_dropped_and_counted():
    p = nq.parse_msgs(packet_msg(3, None) + packet_msg(4, ipv4_udp(), family=socket.AF_INET6))
    assert p.pkt_id == [] and p.bad_id == [3, 4]
    assert p.nlq[nq.NLQ_S_MALFORMED] == 2


def test_parse_message_without_id_is_lost():
    body = struct.pack("=BBH", 2, 0, 0) + _attr(10, ipv4_udp())
    msg = struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body
    p = nq.parse_msgs(msg)
    assert p.pkt_id == [] and p.bad_id == [] and p.lost == 1


def test_parse_netlink_error_is_counted_ack_is_not():
    p = nq.parse_msgs(error_msg(0) + error_msg(-2) + packet_msg(1, ipv4_udp()))
    assert p.pkt_id == [1]
    assert p.nlq[nq.NLQ_S_NL_ERROR] == 1
    assert p.nlq[nq.NLQ_S_NL_LAST_ERROR] == 2


def test_parse_bogus_nlmsg_len_stops_without_raising():
    for bad_len in (0, 3, 15, 1 << 30):
        msg = packet_msg(1, ipv4_udp(), nlmsg_len=bad_len)
        p = nq.parse_msgs(msg)
        assert p.pkt_id == []


def test_parse_three_ways_and_random_batches():
    rng = random.Random(1)
    msgs = [packet_msg(i, ipv4_udp(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 90)))),
                       mark=rng.choice([None, rng.getrandbits(32)])) for i in range(1, 30)]
    whole = b"".join(msgs)
    # whole input
    p = nq.parse_msgs(whole, limit=len(whole) + 64)
    assert _as_tuples(p) == naive_parse(whole, len(whole) + 64)
    assert p.pkt_id == list(range(1, 30))
    # one message per datagram
    for i, m in enumerate(msgs, 1):
        assert nq.parse_msgs(m).pkt_id == [i]
    # with trailing garbage: the garbage (shorter than a header) is ignored
    p = nq.parse_msgs(whole + b"\xff" * 7)
    assert p.pkt_id == list(range(1, 30))


def test_parse_too_many_packets_for_arrays_are_dropped_not_lost():
    data = b"".join(packet_msg(i, ipv4_udp()) for i in range(1, 6))
    p = nq.parse_msgs(data, max_packets=3)
    assert p.pkt_id == [1, 2, 3] and p.bad_id == [4, 5]


# --- building verdicts ------------------------------------------------------------------------------
def test_verdict_accept_drop_encoding_bytes():
    (out,) = nq.build_verdicts(QUEUE, [0x01020304], [C.VERDICT_ACCEPT])
    expect = (struct.pack("=IHHII", 32, 0x301, 1, 0, 0) + struct.pack("!BBH", 0, 0, QUEUE)
              + struct.pack("=HH", 12, 2) + struct.pack("!II", 1, 0x01020304))
    assert out == expect
    (out,) = nq.build_verdicts(QUEUE, [9], [C.VERDICT_DROP])
    assert naive_verdicts(out) == [(1, QUEUE, 0, 9, None)]


def test_verdict_round_trip_mixed():
    payloads = [b"", ipv4_udp(b"abc"), b"", ipv4_udp(b"q" * 7), b""]
    ids = [10, 11, 12, 13, 14]
    verdicts = [C.VERDICT_ACCEPT, C.VERDICT_REWRITE, C.VERDICT_DROP, C.VERDICT_REWRITE, 77]
    (out,) = nq.build_verdicts(QUEUE, ids, verdicts, payloads)
    assert naive_verdicts(out) == [
        (1, QUEUE, 1, 10, None),
        (1, QUEUE, 1, 11, payloads[1]),
        (1, QUEUE, 0, 12, None),
        (1, QUEUE, 1, 13, payloads[3]),
        (1, QUEUE, 0, 14, None),             # unknown engine verdict: dropped
    ]
    assert len(out) % 4 == 0


def test_verdict_batch_form_keeps_individual_non_accepts_first():
    ids = [20, 21, 22, 23]
    verdicts = [C.VERDICT_ACCEPT, C.VERDICT_DROP, C.VERDICT_ACCEPT, C.VERDICT_ACCEPT]
    (out,) = nq.build_verdicts(QUEUE, ids, verdicts, batch_verdict=True, bad_ids=[19])
    assert naive_verdicts(out) == [
        (1, QUEUE, 0, 19, None),             # backend drop
        (1, QUEUE, 0, 21, None),             # engine drop
        (3, QUEUE, 1, 23, None),             # NFQNL_MSG_VERDICT_BATCH: accept the rest <= 23
    ]


def test_no_batch_verdict_without_an_accept():
    (out,) = nq.build_verdicts(QUEUE, [1, 2], [C.VERDICT_DROP, C.VERDICT_REWRITE],
                               [b"", ipv4_udp()], batch_verdict=True)
    assert [m[0] for m in naive_verdicts(out)] == [1, 1]


def test_rewrite_with_bad_length_is_dropped():
    # build_verdicts sets cap = len(payload), so an empty REWRITE is out of bounds
    (out,) = nq.build_verdicts(QUEUE, [5], [C.VERDICT_REWRITE], [b""])
    assert naive_verdicts(out) == [(1, QUEUE, 0, 5, None)]


def test_verdicts_split_when_buffer_full():
    big = [bytes([i]) * 30001 for i in range(5)] + [b""]
    verdicts = [C.VERDICT_REWRITE] * 5 + [C.VERDICT_ACCEPT]
    outs = nq.build_verdicts(QUEUE, list(range(6)), verdicts, big, batch_verdict=True,
                             vbuf_size=nq.VERDICT_MSG_MAX)
    assert len(outs) == 3
    assert all(len(o) <= nq.VERDICT_MSG_MAX for o in outs)
    decoded = [m for o in outs for m in naive_verdicts(o)]
    assert [d[4] for d in decoded[:5]] == big[:5]
    assert decoded[5:] == [(3, QUEUE, 1, 5, None)]


# --- configuration messages -------------------------------------------------------------------------
def test_config_bind_message_bytes():
    msg = nq.config_msg(QUEUE, 5, cmd=nq.NFQNL_CFG_CMD_BIND, copy_mode=nq.NFQNL_COPY_PACKET,
                        copy_range=0xFFFF, maxlen=8192, mask=5, flags=0)
    ln, typ, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (ln, typ, flags, seq) == (len(msg), 0x302, 1 | 4, 5)
    assert msg[16:20] == struct.pack("!BBH", socket.AF_INET, 0, QUEUE)
    attrs = msg[20:]
    assert attrs == (_attr(1, struct.pack("!BBH", 1, 0, socket.AF_INET))
                     + _attr(2, struct.pack("!IB", 0xFFFF, 2))
                     + _attr(3, struct.pack("!I", 8192))
                     + _attr(4, struct.pack("!I", 5))
                     + _attr(5, struct.pack("!I", 0)))


def test_iter_nlmsgs_and_proc_parse():
    data = error_msg(0, seq=3) + error_msg(-1, seq=4)
    assert [(t, s) for t, s, _ in nq.iter_nlmsgs(data)] == [(2, 3), (2, 4)]
    text = ("    7  12345     3 2 65531     5     6      900  1\n"
            "    8  12346     0 2 65531     0     0        0  1\n")
    rows = nq.parse_proc_nfq(text)
    assert rows[7]["queue_dropped"] == 5 and rows[7]["user_dropped"] == 6
    assert rows[8]["portid"] == 12346


def test_fingerprint_distinguishes_engines():
    from numba import njit

    @njit
    def a(*args):
        pass

    @njit
    def b(*args):
        pass

    assert nq.engine_fingerprint(a) != nq.engine_fingerprint(b)
    assert nq.engine_fingerprint(a) == nq.engine_fingerprint(a)


def test_backend_constructor_validates():
    from dataplane import tables
    engine = object()       # never called: nothing is opened
    with pytest.raises(ValueError):
        nq.NetlinkQueue(70000, engine, None, None)
    with pytest.raises(ValueError):
        nq.NetlinkQueue(1, engine, tables.new_config(), tables.new_worker(16), batch=0)
    q = nq.NetlinkQueue(1, engine, tables.new_config(), tables.new_worker(16), batch=4)
    with pytest.raises(RuntimeError):
        q.run_once()
    # receive slots: each iovec points at its own slot of rx
    assert np.all(np.diff(q._rx_iov["iov_base"].astype(np.int64)) == q.slot_size)


# --- NFQA_SKB_INFO (queue configured with NFQA_CFG_F_GSO) -------------------------------------------
def test_parse_skb_info_flags_reach_the_engine_array():
    gso = _attr(14, struct.pack("!I", C.NFQA_SKB_GSO | C.NFQA_SKB_CSUMNOTREADY))     # NFQA_SKB_INFO
    partial = _attr(14, struct.pack("!I", C.NFQA_SKB_CSUMNOTREADY))
    odd = _attr(14, struct.pack("!I", 0xFFFF0000 | C.NFQA_SKB_CSUM_NOTVERIFIED))   # unknown bits
    big = ipv4_udp(b"g" * 9000)
    data = (packet_msg(1, big, extra=gso) + packet_msg(2, ipv4_udp(), extra=partial)
            + packet_msg(3, ipv4_udp()) + packet_msg(4, ipv4_udp(), extra=odd))
    p = nq.parse_msgs(data)
    assert p.pkt_id == [1, 2, 3, 4]
    assert p.skbinfo == [C.NFQA_SKB_GSO | C.NFQA_SKB_CSUMNOTREADY, C.NFQA_SKB_CSUMNOTREADY, 0,
                         C.NFQA_SKB_CSUM_NOTVERIFIED]
    assert p.length[0] == len(big)                      # larger than any MTU, whole
    assert p.nlq[nq.NLQ_S_GSO] == 1 and p.nlq[nq.NLQ_S_CSUM_PARTIAL] == 2
    assert _as_tuples(p) == naive_parse(data)


#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/*): real protocol messages,
so libFuzzer starts from frames a bps peer sends. The files are committed; rerun this after a
change of the wire format (`python3 fuzz/seeds/gen.py`)."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
MAGIC = b"\xb9\x5e"
WIRE_VERSION = 1
HELLO, MSG, WRITE, AUTH = 1, 2, 3, 4


def header(kind, length, imm=0, token=0, offset=0, lane=0):
    return MAGIC + struct.pack("<BBIQQQII", WIRE_VERSION, kind, imm, length, token, offset, lane, 0)


def frame(kind, body, **kw):
    return header(kind, len(body), **kw) + body


def u8(v):
    return struct.pack("<B", v)


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def blob(b):
    return u32(len(b)) + b


def hello(frm, lane=0, lanes=2, shm=b"", nonce=b""):
    return frame(HELLO, u32(frm) + u32(lane) + u32(lanes) + blob(shm) + blob(nonce), lane=lane)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


NONCE = bytes(range(32))
PROOF = bytes(0xA5 for _ in range(32))

# --- handshake: byte 0 = set-up (bit 0: the Net has a secret; bits 1..3: writes - 1) ----------
NO_SECRET, SECRET = 0x00, 0x01
write("handshake", "hello-no-nonce", bytes([NO_SECRET]) + hello(0))
write("handshake", "hello-no-nonce-msg",
      bytes([NO_SECRET | 0x02]) + hello(0) + frame(MSG, b"hello from peer 0"))
write("handshake", "hello-lane1-two-msgs",
      bytes([NO_SECRET | 0x06]) + hello(3, lane=1) + frame(MSG, b"a", lane=1) + frame(MSG, b"bc", lane=1))
write("handshake", "hello-no-nonce-write",
      bytes([NO_SECRET]) + hello(0) + frame(WRITE, b"\x07" * 8, imm=5, token=0x1234_5679))
write("handshake", "hello-nonce-to-secretless-net", bytes([NO_SECRET]) + hello(0, nonce=NONCE))
write("handshake", "hello-nonce", bytes([SECRET]) + hello(0, nonce=NONCE))
write("handshake", "hello-nonce-auth",
      bytes([SECRET | 0x02]) + hello(0, nonce=NONCE) + frame(AUTH, blob(PROOF)))
write("handshake", "hello-nonce-auth-msg",
      bytes([SECRET | 0x04]) + hello(2, nonce=NONCE) + frame(AUTH, blob(PROOF)) + frame(MSG, b"forged"))
write("handshake", "hello-no-nonce-to-secret-net", bytes([SECRET]) + hello(0))
write("handshake", "auth-first", bytes([SECRET]) + frame(AUTH, blob(PROOF)))
write("handshake", "shm-hello", bytes([NO_SECRET]) + hello(0, lanes=1, shm=b"/dev/shm/bps-shm-x"))
# bit 3: the Net runs one lane per peer, so a Hello brings the peer up (Connected).
ONE_LANE, SMALL_MAX = 0x08, 0x10
write("handshake", "one-lane-hello-msg",
      bytes([NO_SECRET | ONE_LANE]) + hello(4, lanes=1) + frame(MSG, b"up"))
write("handshake", "one-lane-hello-nonce-auth",
      bytes([SECRET | ONE_LANE | 0x02]) + hello(4, lanes=1, nonce=NONCE) + frame(AUTH, blob(PROOF)))
write("handshake", "one-lane-second-hello",
      bytes([NO_SECRET | ONE_LANE]) + hello(4, lanes=1) + hello(4, lanes=1))
# bit 5: the Net dials (it is peer 0, one lane); the stranger answers as "peer 1".
DIAL = 0x20
write("handshake", "dial-msg", bytes([NO_SECRET | DIAL]) + frame(MSG, b"from the acceptor"))
write("handshake", "dial-hello-reply", bytes([NO_SECRET | DIAL]) + hello(1, lanes=1, shm=b"rdma-offer-reply"))
write("handshake", "dial-write", bytes([NO_SECRET | DIAL]) + frame(WRITE, b"\x07" * 8, token=0x1234_5679))
write("handshake", "dial-challenge", bytes([SECRET | DIAL]) + frame(AUTH, blob(NONCE) + blob(PROOF)))
write("handshake", "dial-challenge-msg",
      bytes([SECRET | DIAL | 0x02]) + frame(AUTH, blob(NONCE) + blob(PROOF)) + frame(MSG, b"forged"))
write("handshake", "dial-msg-before-challenge", bytes([SECRET | DIAL]) + frame(MSG, b"forged"))
# bit 4: max_msg is 64 bytes.
write("handshake", "small-max-msg-over",
      bytes([NO_SECRET | SMALL_MAX]) + hello(0) + frame(MSG, b"m" * 64) + frame(MSG, b"M" * 65))

# --- codec: 40-byte header, u64 max_msg, op count, ops, body ----------------------------------
def codec(hdr, max_msg, ops, body):
    return hdr + u64(max_msg) + u8(len(ops)) + bytes(ops) + body


# op byte: low 3 bits = read (0 u8, 1 u16, 2 u32, 3 i32, 4 u64, 5 bytes, 6 str, 7 count),
# bits 3..5 = bound index, bits 6..7 (and bit 4) = element size index of count.
body = u8(5) + u32(7) + u64(9) + blob(b"weights") + blob(b"\x01\x02\x03") + u32(0xFFFFFFFC)
write("codec", "hello-walk", codec(header(HELLO, 64), 1 << 20, [0, 2, 4, 6 | 4 << 3, 5 | 3 << 3, 3], body))
write("codec", "msg-count", codec(header(MSG, 4096), 4096, [7 | 4 << 3 | 3 << 6, 2, 2], u32(2) + u32(1) + u32(2)))
write("codec", "write", codec(header(WRITE, 1 << 33, imm=0xDEADBEEF, token=42, offset=7, lane=3), 0, [1, 1, 0], b"\x01\x02\x03\x04\x05"))
write("codec", "auth", codec(header(AUTH, 68), 0, [5 | 3 << 3, 5 | 3 << 3], blob(NONCE) + blob(PROOF)))

# --- proto: Msg encodings (runtime/src/proto.rs) ---------------------------------------------
def s(x):
    return blob(x.encode())


write("proto", "register", u8(1) + u8(1) + u32(0xFFFFFFFF) + u32(1) + u32(2) + u32(4) + u32(2)
      + u64(4 << 20) + u32(2) + s("127.0.0.1:5") + s("/tmp/x") + s("h") + s("n") + u32(9))
write("proto", "welcome", u8(2) + u32(1) + u32(5) + u32(4) + u32(2) + u32(2) + u64(4096) + u32(1)
      + u32(0) + u8(0) + u32(0) + s("a") + s("") + s("h") + s("n"))
write("proto", "refused", u8(3) + s("r"))
write("proto", "place", u8(4) + u32(3) + s("w") + u64(8) + u8(0))
write("proto", "placement", u8(5) + u32(3) + u32(3) + u32(0) + u32(1) + u32(0))
write("proto", "place-error", u8(6) + u32(3) + s("x"))
write("proto", "barrier", u8(7) + u64(1))
write("proto", "barrier-done", u8(8) + u64(1))
write("proto", "goodbye", u8(9))
write("proto", "terminate", u8(10))
write("proto", "peer-dead", u8(11) + u32(2) + s("gone"))
write("proto", "auth-hello", u8(12) + blob(NONCE))
write("proto", "auth-challenge", u8(13) + blob(NONCE) + blob(PROOF))
write("proto", "auth-proof", u8(14) + blob(PROOF))
write("proto", "heartbeat", u8(15))
write("proto", "init-key", u8(20) + u64(7) + u64(9) + u8(3) + u32(4) + s("w") + u8(1) + u32(3))
write("proto", "init-ack", u8(21) + u8(0) + u64(7) + u32(1) + u64(2) + u64(3))
write("proto", "key-error", u8(22) + u64(7) + s("bad"))
write("proto", "set-reply", u8(23) + u32(1) + u64(2) + u64(3))

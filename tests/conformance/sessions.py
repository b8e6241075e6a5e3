#!/usr/bin/env python3
"""Session-level behaviour that libiscsi's suite does not exercise, checked
with a minimal iSCSI initiator written from RFC 7143 (stdlib only):

- session reinstatement: a leading login with an ISID in use ends the old
  session's connection and the new one works;
- connection reinstatement at ErrorRecoveryLevel 0: a login with the
  session's TSIH and the same CID replaces the old connection;
- a second connection (other CID) is refused: MaxConnections is 1;
- a TSIH that names no session is refused with 0x020a;
- with --nop: the target pings an idle initiator with NOP-In and drops a
  connection that does not answer, while one that answers stays up.

Every socket has a timeout; the whole run is bounded. Prints
`sessions: N passed, N failed` and exits non-zero on any failure.
"""
import argparse
import socket
import struct
import sys
import time

INITIATOR = "iqn.2026-11.io.target-rdma:sessions-test"


def pdu(opcode, flags, itt, fields, data=b"", lun=0, imm=True, spec=b""):
    bhs = bytearray(48)
    bhs[0] = opcode | (0x40 if imm else 0)
    bhs[1] = flags
    bhs[5:8] = len(data).to_bytes(3, "big")
    bhs[8:16] = lun.to_bytes(8, "big")
    struct.pack_into(">I", bhs, 16, itt)
    for off, val in fields.items():
        struct.pack_into(">I", bhs, off, val)
    if spec:
        bhs[: len(spec)] = spec
    pad = (4 - len(data) % 4) % 4
    return bytes(bhs) + data + b"\0" * pad


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def recv_pdu(s):
    bhs = recv_exact(s, 48)
    ahs = bhs[4] * 4
    dsl = int.from_bytes(bhs[5:8], "big")
    rest = recv_exact(s, ahs + dsl + (4 - dsl % 4) % 4)
    return bhs, rest[ahs : ahs + dsl]


def login(port, target, isid, tsih=0, cid=0, timeout=5.0, keys=b""):
    """One-PDU login straight to full feature phase, offering `keys` (NUL-
    terminated KEY=VALUE pairs) besides the digests, MaxRecvDataSegmentLength
    and ErrorRecoveryLevel. Returns (sock, status, tsih, statsn)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    text = (
        f"InitiatorName={INITIATOR}\0TargetName={target}\0SessionType=Normal\0"
        "AuthMethod=None\0"
    ).encode()
    spec = bytearray(16)
    spec[0] = 0x43
    spec[1] = 0x81  # T, CSG=0 (security), NSG=1
    spec[8:14] = isid.to_bytes(6, "big")
    spec[14:16] = tsih.to_bytes(2, "big")
    p = bytearray(pdu(0x03, 0x81, 1, {20: cid << 16, 24: 1, 28: 0}, text))
    p[0:2] = spec[0:2]
    p[8:16] = spec[8:16]
    s.sendall(p)
    bhs, data = recv_pdu(s)
    status = (bhs[36], bhs[37])
    if status != (0, 0):
        return s, status, 0, 0
    # Security stage done; move operational -> full feature.
    statsn = struct.unpack_from(">I", bhs, 24)[0]
    p2 = bytearray(pdu(0x03, 0x87, 1, {20: cid << 16, 24: 1, 28: statsn + 1},
                       b"HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=65536\0"
                       b"ErrorRecoveryLevel=0\0" + keys))
    p2[0] = 0x43
    p2[1] = 0x87  # T, CSG=1, NSG=3
    p2[8:16] = spec[8:16]
    s.sendall(p2)
    for _ in range(8):
        bhs, data = recv_pdu(s)
        status = (bhs[36], bhs[37])
        if status != (0, 0):
            return s, status, 0, 0
        if bhs[1] & 0x80 and bhs[1] & 0x03 == 3:
            got_tsih = int.from_bytes(bhs[14:16], "big")
            return s, status, got_tsih, struct.unpack_from(">I", bhs, 24)[0]
        # The target proposed something and held back T: agree and retry.
        statsn = struct.unpack_from(">I", bhs, 24)[0]
        agree = b"".join(
            kv + b"\0" for kv in data.split(b"\0") if kv and not kv.startswith(b"TargetPortalGroupTag")
            and not kv.startswith(b"TargetAlias")
        )
        p3 = bytearray(pdu(0x03, 0x87, 1, {20: cid << 16, 24: 1, 28: statsn + 1}, agree))
        p3[0] = 0x43
        p3[8:16] = spec[8:16]
        s.sendall(p3)
    return s, (0xff, 0xff), 0, 0


def nop(s, itt, cmdsn=1):
    s.sendall(pdu(0x00, 0x80, itt, {20: 0xFFFFFFFF, 24: cmdsn, 28: 0}, b"hi"))
    while True:
        bhs, data = recv_pdu(s)
        if bhs[0] & 0x3F == 0x20 and struct.unpack_from(">I", bhs, 16)[0] == itt:
            return data


def closed_soon(s, seconds):
    s.settimeout(seconds)
    try:
        while True:
            if not s.recv(4096):
                return True
    except (ConnectionResetError, EOFError):
        return True
    except socket.timeout:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--nop", action="store_true",
                    help="the target runs with --nop-interval-s 1 --nop-timeout-s 1")
    a = ap.parse_args()
    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print(f"case {name}: {'ok' if ok else 'FAILED'} {detail}".rstrip(), flush=True)

    t0 = time.time()
    if not a.nop:
        # Session reinstatement.
        s1, st, tsih1, _ = login(a.port, a.target, 0x800000001111)
        check("login", st == (0, 0) and tsih1 != 0, f"status={st} tsih={tsih1}")
        check("nop-echo", nop(s1, 10) == b"hi")
        s2, st, tsih2, _ = login(a.port, a.target, 0x800000001111)
        check("session-reinstatement-login", st == (0, 0), f"status={st}")
        check("session-reinstatement-old-closed", closed_soon(s1, 3.0))
        check("session-reinstatement-new-works", nop(s2, 11) == b"hi")
        # Connection reinstatement with the session's TSIH and CID 0.
        s3, st, tsih3, _ = login(a.port, a.target, 0x800000001111, tsih=tsih2, cid=0)
        check("connection-reinstatement-login", st == (0, 0) and tsih3 == tsih2,
              f"status={st} tsih={tsih3}")
        check("connection-reinstatement-old-closed", closed_soon(s2, 3.0))
        check("connection-reinstatement-new-works", nop(s3, 12) == b"hi")
        # A second connection in the session: MaxConnections is 1.
        s4, st, _, _ = login(a.port, a.target, 0x800000001111, tsih=tsih2, cid=1)
        check("second-connection-refused", st == (2, 6), f"status={st}")
        s4.close()
        # A TSIH that names no session.
        s5, st, _, _ = login(a.port, a.target, 0x800000002222, tsih=0x7777)
        check("unknown-tsih-refused", st == (2, 0x0A), f"status={st}")
        s5.close()
        check("still-serving", nop(s3, 13) == b"hi")
        for s in (s1, s2, s3):
            s.close()
    else:
        # A silent initiator is pinged and dropped; an answering one stays.
        quiet, st, _, _ = login(a.port, a.target, 0x800000003333, timeout=10)
        check("login-quiet", st == (0, 0), f"status={st}")
        chatty, st, _, _ = login(a.port, a.target, 0x800000004444, timeout=10)
        check("login-chatty", st == (0, 0), f"status={st}")
        chatty.settimeout(1.0)
        pinged = 0
        end = time.time() + 5
        while time.time() < end:
            try:
                bhs, data = recv_pdu(chatty)
            except socket.timeout:
                continue
            if bhs[0] & 0x3F == 0x20 and struct.unpack_from(">I", bhs, 16)[0] == 0xFFFFFFFF:
                pinged += 1
                ttt = struct.unpack_from(">I", bhs, 20)[0]
                chatty.sendall(pdu(0x00, 0x80, 0xFFFFFFFF, {20: ttt, 24: 1, 28: 0}))
        check("idle-initiator-pinged", pinged >= 1, f"pings={pinged}")
        check("answering-initiator-kept", nop(chatty, 20) == b"hi")
        check("silent-initiator-dropped", closed_soon(quiet, 5.0))
        quiet.close()
        chatty.close()
    failed = results.count(False)
    print(f"took {time.time() - t0:.1f} s")
    print(f"sessions: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, EOFError) as e:
        print(f"sessions: 0 passed, 1 failed ({e})")
        sys.exit(1)

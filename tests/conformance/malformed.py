#!/usr/bin/env python3
"""Robustness barrage against a running iSCSI target (python3 stdlib only).

Sends malformed, truncated and out-of-order PDUs, cuts connections mid-PDU and
holds many idle connections, then checks after every case that the target still
accepts a connection and completes a fresh login + NOP-Out/NOP-In exchange.

    malformed.py --host 127.0.0.1 --port 3260 --target IQN [--idle 300]
                 [--time-limit 60] [--strict]

Every socket operation has a timeout and the whole run is bounded by
--time-limit. Each case prints one line `case NAME: ok|FAIL (what happened)`.
Outcomes:
  * a case FAILS when the target stops accepting/serving logins afterwards
    (crash, hang, listener gone), or when the positive controls fail;
  * for cases where RFC 7143 requires the target to reject or drop the
    connection, "connection still open and silent after the wait" is reported
    as `lenient` and only fails with --strict (the default for target-rdma,
    see scripts/test.sh; peers such as tgt are run without it).
Prints `malformed: N passed, N failed` at the end; exit 1 if anything failed.
"""

import argparse
import os
import random
import socket
import struct
import sys
import time

OP_NOP_OUT = 0x00
OP_SCSI_CMD = 0x01
OP_LOGIN_REQ = 0x03
OP_TEXT_REQ = 0x04
OP_LOGOUT_REQ = 0x06
OP_NOP_IN = 0x20
OP_LOGIN_RSP = 0x23
OP_REJECT = 0x3F

INITIATOR = "iqn.2024-01.org.target-rdma:malformed-py"

OPERATIONAL_KEYS = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("InitialR2T", "Yes"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "65536"),
    ("DefaultTime2Wait", "0"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("ErrorRecoveryLevel", "0"),
    ("MaxConnections", "1"),
]

ARGS = None
DEADLINE = 0.0
# fixed seed: the "garbage" is the same on every run, so results are reproducible
RNG = random.Random(0x15C51)


def junk(n):
    return RNG.randbytes(n)


class Closed(Exception):
    pass


def remaining():
    return DEADLINE - time.monotonic()


def connect(timeout=3.0, src=None):
    s = socket.create_connection((ARGS.host, ARGS.port), timeout=timeout,
                                 source_address=(src, 0) if src else None)
    s.settimeout(timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def pad4(b):
    return b + b"\0" * ((4 - len(b) % 4) % 4)


def text_data(pairs):
    return b"".join(("%s=%s" % kv).encode() + b"\0" for kv in pairs)


def bhs(opcode, flags=0, dsl=0, lun=b"\0" * 8, itt=0, rest=b"", byte2_3=b"\0\0"):
    """48-byte BHS: opcode, flags, bytes 2-3, TotalAHSLength=0, DSL, LUN/ISID,
    ITT, then the 28 bytes of opcode-specific fields (rest, zero padded)."""
    h = bytes([opcode & 0xFF, flags & 0xFF]) + byte2_3
    h += bytes([0]) + (dsl & 0xFFFFFF).to_bytes(3, "big")
    h += lun[:8].ljust(8, b"\0")
    h += struct.pack(">I", itt & 0xFFFFFFFF)
    h += rest[:28].ljust(28, b"\0")
    assert len(h) == 48
    return h


def login_pdu(csg, nsg, transit, pairs, isid, itt, cmdsn=0, expstatsn=0,
              tsih=0, raw_data=None):
    flags = (0x80 if transit else 0) | ((csg & 3) << 2) | (nsg & 3)
    data = raw_data if raw_data is not None else text_data(pairs)
    # bytes 8-13 ISID, 14-15 TSIH
    lun_field = isid + struct.pack(">H", tsih)
    rest = struct.pack(">HH", 0, 0)  # CID, reserved
    rest += struct.pack(">II", cmdsn, expstatsn)
    h = bhs(0x40 | OP_LOGIN_REQ, flags, len(data), lun_field, itt, rest)
    return h + pad4(data)


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise Closed("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def recv_pdu(s):
    h = recv_exact(s, 48)
    ahs = h[4] * 4
    dsl = int.from_bytes(h[5:8], "big")
    if ahs:
        recv_exact(s, ahs)
    data = recv_exact(s, dsl + ((4 - dsl % 4) % 4))[:dsl] if dsl else b""
    return h, data


def parse_keys(data):
    out = {}
    for item in data.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def new_isid():
    return bytes([0x80]) + os.urandom(5)


def login(s, target=None):
    """Minimal normal-session login: security stage with AuthMethod=None, then
    operational stage with the keys above, to full feature phase.
    Returns (statsn, expcmdsn) of the final login response."""
    target = target or ARGS.target
    isid = new_isid()
    itt = 1
    first = [
        ("InitiatorName", INITIATOR),
        ("TargetName", target),
        ("SessionType", "Normal"),
        ("AuthMethod", "None"),
    ]
    csg, nsg = 0, 1
    pairs = first
    tsih = 0
    statsn = 0
    for _ in range(6):
        s.sendall(login_pdu(csg, nsg, True, pairs, isid, itt, 0, statsn, tsih))
        h, data = recv_pdu(s)
        op = h[0] & 0x3F
        if op != OP_LOGIN_RSP:
            raise RuntimeError("expected Login Response, got opcode 0x%02x" % op)
        cls, det = h[36], h[37]
        if cls != 0:
            raise RuntimeError("login rejected: status 0x%02x%02x" % (cls, det))
        statsn = struct.unpack(">I", h[24:28])[0] + 1
        tsih = struct.unpack(">H", h[14:16])[0]
        keys = parse_keys(data)
        rt, rcsg, rnsg = bool(h[1] & 0x80), (h[1] >> 2) & 3, h[1] & 3
        if rt and rnsg == 3:
            return statsn, struct.unpack(">I", h[28:32])[0]
        if rt:
            csg, nsg = rnsg, 3
        if csg == 0 and keys.get("AuthMethod") not in (None, "None"):
            raise RuntimeError("target wants AuthMethod=%s" % keys.get("AuthMethod"))
        pairs = OPERATIONAL_KEYS if csg == 1 else []
        if csg == 1:
            nsg = 3
    raise RuntimeError("login did not reach full feature phase")


def nop_ping(s, statsn, cmdsn, itt=0x1234):
    rest = struct.pack(">III", 0xFFFFFFFF, cmdsn, statsn)  # TTT, CmdSN, ExpStatSN
    s.sendall(bhs(0x40 | OP_NOP_OUT, 0x80, 0, b"\0" * 8, itt, rest))
    while True:
        h, _ = recv_pdu(s)
        if h[0] & 0x3F == OP_NOP_IN and struct.unpack(">I", h[16:20])[0] == itt:
            return True


def scsi_cmd_pdu(cdb, itt, cmdsn, statsn, edtl=0, read=False, write=False,
                 dsl=None, data=b""):
    flags = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 0x01  # F, R/W, SIMPLE
    rest = struct.pack(">III", edtl, cmdsn, statsn) + cdb.ljust(16, b"\0")
    dl = len(data) if dsl is None else dsl
    return bhs(OP_SCSI_CMD, flags, dl, b"\0" * 8, itt, rest) + pad4(data)


def healthy():
    """Fresh connection, login and NOP ping. Returns None or an error string."""
    try:
        s = connect(5.0)
    except OSError as e:
        return "connect failed: %s" % e
    try:
        statsn, expcmdsn = login(s)
        nop_ping(s, statsn, expcmdsn)
        return None
    except (OSError, Closed, RuntimeError) as e:
        return "login/NOP failed: %s" % e
    finally:
        s.close()


def observe(s, wait):
    """After sending something bad: what does the target do within `wait`?
    Returns 'closed', 'reject', 'login-rsp:0xCCDD', 'pdu:0xOP' or 'open'."""
    s.settimeout(wait)
    try:
        h, _ = recv_pdu(s)
    except socket.timeout:
        return "open"
    except (Closed, ConnectionError):
        return "closed"
    except OSError:
        return "closed"
    op = h[0] & 0x3F
    if op == OP_REJECT:
        return "reject"
    if op == OP_LOGIN_RSP:
        return "login-rsp:0x%02x%02x" % (h[36], h[37])
    return "pdu:0x%02x" % op


RESULTS = []


def record(name, ok, what, lenient=False):
    tag = "ok" if ok else ("lenient" if lenient else "FAIL")
    print("case %s: %s (%s)" % (name, tag, what), flush=True)
    RESULTS.append((name, ok or (lenient and not ARGS.strict)))


def expect_refusal(name, outcome, accept_login_error=True):
    """Cases where the target must reject or drop: closed / reject / login
    response with an error class are fine; silence is lenient (see --strict)."""
    if outcome in ("closed", "reject"):
        return True, False
    if accept_login_error and outcome.startswith("login-rsp:") and not outcome.startswith("login-rsp:0x00"):
        return True, False
    if outcome == "open":
        return False, True
    return False, False


def run_case(name, fn, must_refuse=True):
    if remaining() < 3:
        record(name, False, "not run: time limit reached")
        return
    try:
        outcome = fn()
    except (Closed, ConnectionError) as e:
        # the target dropped us while we were still sending: a refusal
        outcome = "closed"
    except (OSError, RuntimeError) as e:
        outcome = "error: %s" % e
    if outcome is not None and outcome.startswith("error: "):
        ok, lenient, what = False, False, outcome
    elif must_refuse:
        ok, lenient = expect_refusal(name, outcome)
        what = "target answered: %s" % outcome
    else:
        ok, lenient, what = True, False, "sent" + (" (%s)" % outcome if outcome else "")
    err = healthy()
    if err:
        record(name, False, "%s; target unhealthy afterwards: %s" % (what, err))
    else:
        record(name, ok, what, lenient)


# ---------------------------------------------------------------- the cases

WAIT = 3.0


def good_first_login():
    return login_pdu(0, 1, True, [("InitiatorName", INITIATOR), ("TargetName", ARGS.target),
                                  ("SessionType", "Normal"), ("AuthMethod", "None")],
                     new_isid(), 1)


def case_truncated(n):
    def f():
        s = connect()
        s.sendall(good_first_login()[:n])
        s.close()
        return None
    return f


def case_truncated_then_wait():
    # half a header, then silence: the target may wait or drop, must not block others
    s = connect()
    s.sendall(good_first_login()[:20])
    other = healthy()
    s.close()
    if other:
        raise RuntimeError("a half-sent header blocked other logins: " + other)
    return None


def case_scsi_before_login():
    s = connect()
    s.sendall(scsi_cmd_pdu(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 7, 0, 0, 512, read=True))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_nop_before_login():
    s = connect()
    s.sendall(bhs(0x40 | OP_NOP_OUT, 0x80, 0, b"\0" * 8, 9, struct.pack(">III", 0xFFFFFFFF, 0, 0)))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_login_random_bytes():
    s = connect()
    h = bytearray(junk(48))
    h[0] = 0x43
    h[4] = 0
    h[5:8] = (200).to_bytes(3, "big")
    s.sendall(bytes(h) + junk(200))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_login_garbage_text():
    s = connect()
    s.sendall(login_pdu(0, 1, True, None, new_isid(), 1,
                        raw_data=b"\xff\xfe=garbage\0noequals\0=\0" + junk(64)))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_login_bad_version():
    s = connect()
    pdu = bytearray(good_first_login())
    pdu[2], pdu[3] = 0x7F, 0x7E  # VersionMax < VersionMin, unsupported
    s.sendall(bytes(pdu))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_login_unknown_target():
    s = connect()
    s.sendall(login_pdu(0, 1, True, [("InitiatorName", INITIATOR),
                                     ("TargetName", "iqn.2000-01.invalid:no-such-target"),
                                     ("SessionType", "Normal"), ("AuthMethod", "None")],
                        new_isid(), 1))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_login_huge_dsl():
    # login PDU declaring a 16 MiB data segment (far above 8192 allowed in login)
    s = connect()
    h = bytearray(good_first_login()[:48])
    h[5:8] = (16 << 20).to_bytes(3, "big") if (16 << 20) < (1 << 24) else b"\xff\xff\xff"
    s.sendall(bytes(h) + b"InitiatorName=" + b"x" * 4000)
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def logged_in():
    try:
        s = connect()
        statsn, cmdsn = login(s)
    except (OSError, Closed, RuntimeError) as e:
        raise RuntimeError("setup login failed: %s" % e)
    return s, statsn, cmdsn


def case_ffp_huge_dsl():
    # SCSI WRITE in full feature phase whose data segment (16 MiB - 1) exceeds
    # the negotiated MaxRecvDataSegmentLength
    s, statsn, cmdsn = logged_in()
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0x80, 0, 0])  # WRITE(10) 32768 blocks
    s.sendall(scsi_cmd_pdu(cdb, 11, cmdsn, statsn, 16 << 20, write=True, dsl=0xFFFFFF)[:48]
              + b"\0" * 65536)
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_ffp_read_huge_edtl():
    # READ(10) of 8 blocks whose Expected Data Transfer Length claims almost
    # 4 GiB: the target must answer with the 8 blocks (and an underflow
    # residual) or a CHECK CONDITION, promptly; sizing a buffer by the
    # EDTL would take gigabytes of memory for one PDU.
    s, statsn, cmdsn = logged_in()
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
    s.sendall(scsi_cmd_pdu(cdb, 12, cmdsn, statsn, 0xFFFFFF00, read=True))
    s.settimeout(WAIT)
    try:
        while True:
            h, _ = recv_pdu(s)
            op = h[0] & 0x3F
            # The status: a SCSI Response, or a Data-In with S set.
            if op == 0x21 or (op == 0x25 and h[1] & 0x01):
                return None
    except socket.timeout:
        return "error: no status within %.0f s" % WAIT
    finally:
        s.close()


def case_ffp_garbage():
    # random bytes, except that the first header carries a reserved initiator
    # opcode (0x1e), no AHS and a 1000-byte data segment, so a target must
    # reject it or drop the connection instead of waiting for more bytes
    s, statsn, cmdsn = logged_in()
    g = bytearray(junk(4096))
    g[0] = 0x1E
    g[4] = 0
    g[5:8] = (1000).to_bytes(3, "big")
    s.sendall(bytes(g))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_ffp_unknown_opcode():
    s, statsn, cmdsn = logged_in()
    s.sendall(bhs(0x1D, 0x80, 0, b"\0" * 8, 21, struct.pack(">III", 0, cmdsn, statsn)))
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_ffp_login_again():
    s, statsn, cmdsn = logged_in()
    s.sendall(good_first_login())
    try:
        return observe(s, WAIT)
    finally:
        s.close()


def case_ffp_cut_mid_header():
    s, statsn, cmdsn = logged_in()
    cdb = bytes([0x2A, 0, 0, 0, 0, 0x10, 0, 0, 8, 0])
    s.sendall(scsi_cmd_pdu(cdb, 12, cmdsn, statsn, 4096, write=True, data=b"\xee" * 4096)[:30])
    s.close()
    return None


def case_ffp_cut_mid_data():
    s, statsn, cmdsn = logged_in()
    cdb = bytes([0x2A, 0, 0, 0, 0, 0x10, 0, 0, 8, 0])  # WRITE(10) LBA 0x1000, 8 blocks
    s.sendall(scsi_cmd_pdu(cdb, 13, cmdsn, statsn, 4096, write=True, data=b"\xee" * 4096)[:48 + 1000])
    s.close()
    return None


def case_ffp_cut_with_reads_in_flight():
    s, statsn, cmdsn = logged_in()
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0x08, 0, 0])  # READ(10) 2048 blocks = 1 MiB
    for i in range(16):
        s.sendall(scsi_cmd_pdu(cdb, 100 + i, cmdsn + i, statsn, 1 << 20, read=True))
    s.recv(100)
    s.close()
    return None


def case_login_cut_mid_data():
    s = connect()
    s.sendall(good_first_login()[:60])
    s.close()
    return None


IDLE_PER_ADDRESS = 50


def case_idle_connections():
    n = ARGS.idle
    socks = []
    try:
        for i in range(n):
            if remaining() < 8:
                raise RuntimeError("time limit while opening idle connections (%d open)" % i)
            # On loopback, spread over source addresses, IDLE_PER_ADDRESS
            # each: target-rdma gives one peer address at most 64 login
            # slots (hostile.py checks that), and this case is about many
            # idle connections, not one address hoarding them.
            src = None
            if ARGS.host.startswith("127."):
                src = "127.0.1.%d" % (1 + i // IDLE_PER_ADDRESS)
            socks.append(connect(5.0, src))
        # with all of them open, a normal client must still get in
        err = healthy()
        if err:
            raise RuntimeError("with %d idle connections open: %s" % (n, err))
        time.sleep(1.0)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    continue
            except BlockingIOError:
                pass
            except OSError:
                continue
            alive += 1
        return "%d idle connections held, %d still open after 1 s" % (n, alive)
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def main():
    global ARGS, DEADLINE
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--idle", type=int, default=300)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--strict", action="store_true",
                    help="silence where a reject/drop is required is a failure")
    ARGS = ap.parse_args()
    DEADLINE = time.monotonic() + ARGS.time_limit

    err = healthy()
    record("control-login", err is None, err or "login to FFP + NOP-Out/NOP-In works")
    if err:
        print("malformed: 0 passed, 1 failed")
        return 1

    for n in (1, 8, 47, 48):
        run_case("truncated-header-%d-bytes-then-close" % n, case_truncated(n), must_refuse=False)
    run_case("truncated-header-then-silence", case_truncated_then_wait, must_refuse=False)
    run_case("scsi-command-before-login", case_scsi_before_login)
    run_case("nop-out-before-login", case_nop_before_login)
    run_case("login-random-bytes", case_login_random_bytes)
    run_case("login-garbage-text", case_login_garbage_text)
    run_case("login-unsupported-version", case_login_bad_version)
    run_case("login-unknown-target", case_login_unknown_target)
    run_case("login-dsl-16MiB", case_login_huge_dsl)
    run_case("login-cut-mid-data", case_login_cut_mid_data, must_refuse=False)
    run_case("ffp-dsl-16MiB", case_ffp_huge_dsl)
    run_case("ffp-read-edtl-4GiB", case_ffp_read_huge_edtl, must_refuse=False)
    run_case("ffp-garbage", case_ffp_garbage)
    run_case("ffp-unknown-opcode", case_ffp_unknown_opcode)
    run_case("ffp-login-pdu-again", case_ffp_login_again)
    run_case("ffp-cut-mid-header", case_ffp_cut_mid_header, must_refuse=False)
    run_case("ffp-cut-mid-data", case_ffp_cut_mid_data, must_refuse=False)
    run_case("ffp-cut-with-reads-in-flight", case_ffp_cut_with_reads_in_flight, must_refuse=False)
    run_case("idle-connections-%d" % ARGS.idle, case_idle_connections, must_refuse=False)

    err = healthy()
    record("final-login", err is None, err or "target still serves logins")
    passed = sum(1 for _, ok in RESULTS if ok)
    failed = len(RESULTS) - passed
    print("malformed: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Hostile clients against a target with CHAP and an --allow list, with a
minimal iSCSI initiator written from RFC 7143 (stdlib only, raw sockets on
loopback):

(c) name probing: the login of an unknown target name, of an initiator not
    on the allow list and of a wrong secret fail alike with 02/01, with the
    same responses byte for byte (but for StatSN, random per connection, and
    CHAP_I/CHAP_C, random per challenge);
(a) CHAP guessing: up to 2,000 wrong-secret logins from 127.0.0.1 with one
    initiator name take at least the time the target's policy implies (five
    free failures, then 100 ms doubling to 5 s; README "Failed logins and
    login floods"), while another initiator from 127.0.0.5 logs in within
    1 s throughout; afterwards the right secret logs in from 127.0.0.1;
(a2) the same with 32 connections at a time from 127.0.0.9: answers are
    spaced out as one by one, the excess is refused (closed unanswered);
(b) login flood: 127.0.0.1 opens 2,000 connections and stalls them (nothing
    or half a Login Request); an initiator from 127.0.0.5 logs in within
    1 s, several times, throughout.

The target is started by the caller (scripts/test.sh) with
--chap USER:SECRET --allow GUESSER --allow LEGIT (the names below). Every
socket has a timeout and every phase a time budget; the run takes about
40 s. The challenge response is compared without CHAP_I/CHAP_C values and
its data segment length, which the random CHAP_I's digits change. Prints `hostile: N passed, N failed` and exits non-zero on any failure.
"""
import argparse
import hashlib
import json
import resource
import socket
import struct
import sys
import threading
import time

from sessions import recv_pdu

GUESSER = "iqn.2026-11.io.target-rdma:hostile-guesser"
LEGIT = "iqn.2026-11.io.target-rdma:hostile-legit"
STRANGER = "iqn.2026-11.io.target-rdma:hostile-not-allowed"

# The target's policy (target-rdma/src/guard.rs).
FAILURES_FREE = 5
DELAY_MIN = 0.1
DELAY_MAX = 5.0

GUESSES = 2000
GUESS_BUDGET_S = 20.0
FLOOD = 2000
FLOOD_HOLD_S = 3.0
LATENCY_MAX_S = 1.0
PARALLEL = 32
PARALLEL_S = 4.0
PARALLEL_WAIT_S = 3.0
PARALLEL_NAME = "iqn.2026-11.io.target-rdma:hostile-parallel"


def delay_after(failures):
    if failures < FAILURES_FREE:
        return 0.0
    return min(DELAY_MIN * 2 ** min(failures - FAILURES_FREE, 16), DELAY_MAX)


def pdu(opcode, flags, itt, fields, data=b"", isid=0x800000000001, imm=True):
    bhs = bytearray(48)
    bhs[0] = opcode | (0x40 if imm else 0)
    bhs[1] = flags
    bhs[5:8] = len(data).to_bytes(3, "big")
    bhs[8:14] = isid.to_bytes(6, "big")
    struct.pack_into(">I", bhs, 16, itt)
    for off, val in fields.items():
        struct.pack_into(">I", bhs, off, val)
    pad = (4 - len(data) % 4) % 4
    return bytes(bhs) + data + b"\0" * pad


def keys(data):
    out = {}
    for kv in data.split(b"\0"):
        if b"=" in kv:
            k, v = kv.split(b"=", 1)
            out[k.decode()] = v.decode()
    return out


def text(pairs):
    return b"".join(f"{k}={v}\0".encode() for k, v in pairs)


def login_req(csg, nsg, transit, data, cmdsn=1, expstatsn=0):
    flags = (0x80 if transit else 0) | (csg << 2) | nsg
    return pdu(0x03, flags, 1, {20: 0, 24: cmdsn, 28: expstatsn}, data)


def connect(src, port, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    return s


def chap_login(port, target, initiator, user, secret, src="127.0.0.1", timeout=15.0,
               full=True):
    """A CHAP (MD5) login. Returns (status, responses): status is the
    (class, detail) of the last Login Response, or "closed" when the target
    closed without one; responses the (bhs, data) of each response."""
    resps = []
    s = connect(src, port, timeout)
    try:
        s.sendall(login_req(0, 1, False, text([
            ("InitiatorName", initiator), ("TargetName", target),
            ("SessionType", "Normal"), ("AuthMethod", "CHAP")])))
        for step in range(3):
            try:
                bhs, data = recv_pdu(s)
            except (EOFError, ConnectionResetError):
                return "closed", resps
            resps.append((bhs, data))
            status = (bhs[36], bhs[37])
            statsn = struct.unpack_from(">I", bhs, 24)[0]
            if status != (0, 0):
                return status, resps
            if step == 0:
                s.sendall(login_req(0, 1, False, text([("CHAP_A", "5")]), expstatsn=statsn + 1))
            elif step == 1:
                k = keys(data)
                cid = int(k["CHAP_I"], 0)
                chal = bytes.fromhex(k["CHAP_C"][2:])
                r = hashlib.md5(bytes([cid]) + secret.encode() + chal).hexdigest()
                s.sendall(login_req(0, 1, True, text([("CHAP_N", user), ("CHAP_R", "0x" + r)]),
                                    expstatsn=statsn + 1))
        if not full:
            return (bhs[36], bhs[37]), resps
        # Authenticated: operational stage, then full feature phase.
        offer = text([("HeaderDigest", "None"), ("DataDigest", "None"),
                      ("MaxRecvDataSegmentLength", "65536"), ("ErrorRecoveryLevel", "0")])
        for _ in range(6):
            s.sendall(login_req(1, 3, True, offer, expstatsn=statsn + 1))
            bhs, data = recv_pdu(s)
            resps.append((bhs, data))
            status = (bhs[36], bhs[37])
            statsn = struct.unpack_from(">I", bhs, 24)[0]
            if status != (0, 0) or (bhs[1] & 0x80 and bhs[1] & 3 == 3):
                return status, resps
            # The target proposed keys and held back T: agree.
            offer = b"".join(kv + b"\0" for kv in data.split(b"\0") if kv
                             and not kv.startswith((b"TargetPortalGroupTag", b"TargetAlias")))
        return (0xff, 0xff), resps
    except (EOFError, ConnectionResetError):
        return "closed", resps
    except socket.timeout:
        return "timeout", resps
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--stats-file", help="the target's --stats-file, to check its counters")
    a = ap.parse_args()
    results = []

    def check(name, ok, detail=""):
        results.append(bool(ok))
        print(f"case {name}: {'ok' if ok else 'FAILED'} {detail}".rstrip(), flush=True)

    t_start = time.time()
    good = dict(user=a.user, secret=a.secret)

    # ---- (c) name probing, from its own address and with the other
    # initiator's name, so that the guesser's counts in (a) start at 0 (the
    # other initiator's first login in (a) resets its name's)
    probes = {
        "wrong-secret": chap_login(a.port, a.target, LEGIT, a.user, "wrong-secret-000",
                                   src="127.0.0.7", full=False),
        "unknown-target": chap_login(a.port, a.target + "-nope", LEGIT, a.user, a.secret,
                                     src="127.0.0.7", full=False),
        "not-allowed": chap_login(a.port, a.target, STRANGER, a.user, a.secret,
                                  src="127.0.0.7", full=False),
    }

    def masked(resps):
        out = []
        for i, (bhs, data) in enumerate(resps):
            b = bytearray(bhs)
            b[24:28] = b"\0" * 4  # StatSN: random per connection
            d = data
            if b"CHAP_C=" in data:
                # The challenge: CHAP_I and CHAP_C are random per login, and
                # so the data segment's length (CHAP_I has 1 to 3 digits).
                b[5:8] = b"\0" * 3
                d = b"".join(kv.split(b"=")[0] + b"\0" for kv in data.split(b"\0") if kv)
            out.append((bytes(b), d))
        return out

    ref_status, ref = probes["wrong-secret"]
    for name, (st, resps) in probes.items():
        print(f"  probe {name}: status {st}, {len(resps)} responses")
    check("probe-wrong-secret-is-02/01", ref_status == (2, 1), f"status={ref_status}")
    for name in ("unknown-target", "not-allowed"):
        st, resps = probes[name]
        check(f"probe-{name}-is-02/01", st == (2, 1), f"status={st}")
        check(f"probe-{name}-same-bytes", masked(resps) == masked(ref),
              f"{len(resps)} vs {len(ref)} responses")

    # ---- (a) CHAP guessing, with a second initiator logging in meanwhile
    stop = threading.Event()
    legit_lat = []

    def legit(lat, src="127.0.0.5"):
        while not stop.is_set():
            t = time.time()
            st, _ = chap_login(a.port, a.target, LEGIT, src=src, timeout=5.0, **good)
            lat.append((time.time() - t, st, t))
            stop.wait(0.5)

    th = threading.Thread(target=legit, args=(legit_lat,))
    th.start()
    answered = []  # (time done, status) of every guess
    t0 = time.time()
    for i in range(GUESSES):
        if time.time() - t0 > GUESS_BUDGET_S:
            break
        st, _ = chap_login(a.port, a.target, GUESSER, a.user, f"guess-{i:012d}", timeout=15.0,
                           full=False)
        answered.append((time.time() - t0, st))
    guess_time = time.time() - t0
    stop.set()
    th.join(10)
    n = len(answered)
    evaluated = sum(1 for _, st in answered if st == (2, 1))
    first = answered[:FAILURES_FREE]
    first_rate = len(first) / max(first[-1][0], 1e-6) if first else 0.0
    later = answered[FAILURES_FREE:]
    later_span = (later[-1][0] - first[-1][0]) if later else 0.0
    later_rate = len(later) / later_span if later_span > 0 else 0.0
    # The waits the policy imposes between the guesses made: the k-th
    # failure (k >= 5) holds the next attempt delay_after(k).
    implied = sum(delay_after(k) for k in range(1, n))
    print(f"  guessing: {n} attempts in {guess_time:.1f} s ({evaluated} answered 02/01); "
          f"first {len(first)}: {first_rate:.0f} guesses/s; "
          f"after throttling: {len(later)} in {later_span:.1f} s = {later_rate:.2f} guesses/s; "
          f"policy implies >= {implied:.1f} s; all {GUESSES} would take >= "
          f"{sum(delay_after(k) for k in range(1, GUESSES)):.0f} s")
    check("guessing-no-wrong-success", all(st != (0, 0) for _, st in answered))
    check("guessing-takes-the-policy-time", guess_time >= 0.9 * implied and n < GUESSES,
          f"{n} guesses in {guess_time:.1f} s, policy >= {implied:.1f} s")
    check("guessing-throttled-below-1-per-s", later and later_rate < 1.0,
          f"{later_rate:.2f} guesses/s")
    lat = [x for x, _, _ in legit_lat]
    print(f"  other initiator during guessing: {len(lat)} logins, "
          f"latency max {max(lat, default=0):.3f} s, statuses {sorted({str(s) for _, s, _ in legit_lat})}")
    check("other-initiator-logs-in-during-guessing",
          legit_lat and all(st == (0, 0) and x < LATENCY_MAX_S for x, st, _ in legit_lat),
          f"{len(lat)} logins, max {max(lat, default=0):.3f} s")
    t = time.time()
    st, _ = chap_login(a.port, a.target, GUESSER, timeout=15.0, **good)
    waited = time.time() - t
    print(f"  right secret from the guesser after the window: status {st} in {waited:.2f} s")
    check("right-secret-after-window", st == (0, 0) and waited <= DELAY_MAX + 2,
          f"status={st} in {waited:.2f} s")

    # ---- (a2) parallel guessing: 32 connections at a time, from its own
    # address and with a name not on the allow list (which fails with 02/01
    # too, and counts): after the first wave attempts are spaced out, the
    # excess refused
    par = []
    par_lock = threading.Lock()
    t0 = time.time()

    def par_guesser(j):
        k = 0
        while time.time() - t0 < PARALLEL_S:
            st, _ = chap_login(a.port, a.target, PARALLEL_NAME, a.user, f"par-{j}-{k:08d}",
                               src="127.0.0.9", timeout=PARALLEL_WAIT_S, full=False)
            with par_lock:
                par.append(st)
            k += 1

    ths = [threading.Thread(target=par_guesser, args=(j,)) for j in range(PARALLEL)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(PARALLEL_S + PARALLEL_WAIT_S + 5)
    window = time.time() - t0
    n_ans = par.count((2, 1))
    n_closed = par.count("closed")
    n_timeout = par.count("timeout")
    # Attempts the policy answers in the window: the first wave (a key
    # that never failed has its parallel attempts go at once, as a host
    # logging in many sessions would), then one per delay (each booked
    # after the one before).
    allowed, spent, k = max(PARALLEL, FAILURES_FREE), 0.0, max(PARALLEL, FAILURES_FREE)
    while spent + delay_after(k) <= window:
        spent += delay_after(k)
        allowed += 1
        k += 1
    print(f"  parallel guessing: {len(par)} attempts on {PARALLEL} connections in {window:.1f} s: "
          f"{n_ans} answered 02/01 ({n_ans / window:.1f} guesses/s; policy allows <= {allowed}), "
          f"{n_closed} refused, {n_timeout} still held after {PARALLEL_WAIT_S:.0f} s")
    check("parallel-guessing-spaced-out", n_ans <= allowed + 1, f"{n_ans} <= {allowed} + 1")
    check("parallel-guessing-excess-refused", n_closed >= 1, f"{n_closed} refused")
    check("parallel-guessing-no-other-outcome",
          n_ans + n_closed + n_timeout == len(par), str(sorted({str(x) for x in par})))

    # ---- (b) login flood from 127.0.0.1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 200
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        except (ValueError, OSError):
            pass
    flood = []
    flood_err = 0
    flood_lat = []
    stop.clear()
    th = threading.Thread(target=legit, args=(flood_lat,))
    half = login_req(0, 1, False, text([("InitiatorName", GUESSER)]))[:30]
    t0 = time.time()
    th.start()
    for i in range(FLOOD):
        try:
            s = connect("127.0.0.1", a.port, 2.0)
            if i % 2:
                s.sendall(half)
            flood.append(s)
        except OSError:
            flood_err += 1
    opened = time.time() - t0
    # Keep them all open and stalled a while longer, the other initiator
    # still trying: the logins that count most are those after the last
    # flood connection was opened.
    t_all = time.time()
    stop.wait(FLOOD_HOLD_S)
    stop.set()
    th.join(10)
    lat = [x for x, _, _ in flood_lat]
    after = [(x, st) for x, st, t in flood_lat if t >= t_all]
    print(f"  flood: {len(flood)} connections opened in {opened:.1f} s ({flood_err} failed); "
          f"other initiator: {len(lat)} logins ({len(after)} with all {len(flood)} open), "
          f"latency max {max(lat, default=0):.3f} s, "
          f"statuses {sorted({str(s) for _, s, _ in flood_lat})}")
    check("other-initiator-logs-in-during-flood",
          len(after) >= 3 and all(st == (0, 0) and x < LATENCY_MAX_S for x, st, _ in flood_lat),
          f"{len(lat)} logins, {len(after)} with all open, max {max(lat, default=0):.3f} s")
    for s in flood:
        s.close()

    if a.stats_file:
        time.sleep(1.2)  # rewritten every second
        try:
            with open(a.stats_file) as f:
                g = json.load(f).get("login_guard", {})
        except (OSError, ValueError) as e:
            g = {"error": str(e)}
        print(f"  stats login_guard: {g}")
        check("stats-counters", g.get("auth_failures", 0) >= FAILURES_FREE
              and g.get("auth_delayed", 0) >= 1 and g.get("auth_refused", 0) >= 1
              and g.get("peer_share_refused", 0) >= 1 and "auth_keys" in g, json.dumps(g))

    failed = results.count(False)
    print(f"took {time.time() - t_start:.1f} s")
    print(f"hostile: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, EOFError, KeyError, ValueError) as e:
        print(f"hostile: 0 passed, 1 failed ({type(e).__name__}: {e})")
        sys.exit(1)

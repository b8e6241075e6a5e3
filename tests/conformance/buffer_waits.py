#!/usr/bin/env python3
"""Commands waiting for data buffers, checked with the minimal initiator of
sessions.py against a target started with a small pool (--buffer-pool-mib
64) and --stats-file:

- 64 READ(10)s of 1 MiB are sent while the initiator reads nothing, so the
  pool's 1 MiB class runs dry (buffers stay with responses the socket
  cannot take) and the later reads wait for buffers;
- ABORT TASK for the last read, sent right behind the reads so that the
  target takes it in while that read still waits (a second later, waiting
  reads may have taken pieces of smaller buffers as the socket absorbed
  earlier responses, and all had run), is answered with FUNCTION
  COMPLETE, that read gets no response, and the LUN never runs it;
- every other read completes with GOOD and its 1 MiB of data;
- the connection still answers a NOP-Out afterwards, and the target's
  counters show commands waited (data_pool_waits > 0) and none took a heap
  buffer (data_pool_misses == 0);
- with InitialR2T=No and ImmediateData=No, 40 WRITE(10)s of 1 MiB are sent
  before any of their unsolicited Data-Outs (as Linux's iSER initiator
  does): the later writes wait for buffers, and the Data-Outs of earlier
  ones, queued behind a waiting write, must still reach their tasks (a
  first version let them wait behind it, and the tasks holding every
  buffer waited for them for ever); every write completes with GOOD, the
  R2Ts answered; the connection, left idle, gives its receive ring back
  to the pool (rx_rings_released > 0), and what was written then reads
  back.

Prints `buffer-waits: N passed, N failed` and exits non-zero on a failure.
"""
import argparse
import json
import socket
import struct
import sys
import time

from sessions import login, nop, pdu, recv_pdu

READS = 64
BLOCKS = 2048  # of 512 bytes: 1 MiB
FIRST_ITT = 100
TMF_ITT = 500


def stats_sum(path, field):
    with open(path) as f:
        return sum(r[field] for r in json.load(f)["reactors"])


def lun_reads(path):
    with open(path) as f:
        return sum(lun["io"]["reads"] for lun in json.load(f)["luns"])


READ10 = 0x28
WRITE10 = 0x2A


def rw10(op, itt, lba, cmdsn, statsn):
    """A SCSI Command PDU of READ(10) or WRITE(10) for BLOCKS blocks at
    `lba`, SIMPLE: a read with F set, a write with F clear (its
    unsolicited data follows in Data-Out PDUs)."""
    flags = 0xC1 if op == READ10 else 0x21
    cmd = bytearray(pdu(0x01, flags, itt, {20: BLOCKS * 512, 24: cmdsn, 28: statsn + 1},
                        imm=False))
    cmd[32:48] = struct.pack(">BBIBHB", op, 0, lba, 0, BLOCKS, 0) + b"\0" * 6
    return bytes(cmd)


def take_unit_attention(s, statsn, cmdsn):
    """TEST UNIT READY, which takes the unit attention a new nexus reports
    (power on) that would otherwise fail the first real command. Returns
    the StatSN of its response."""
    s.sendall(pdu(0x01, 0x81, 50, {20: 0, 24: cmdsn, 28: statsn + 1}, imm=False))
    while True:
        bhs, _ = recv_pdu(s)
        if bhs[0] & 0x3F == 0x21 and struct.unpack_from(">I", bhs, 16)[0] == 50:
            return struct.unpack_from(">I", bhs, 24)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--stats", required=True)
    a = ap.parse_args()
    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print(f"case {name}: {'ok' if ok else 'FAILED'} {detail}".rstrip(), flush=True)

    s, st, _, statsn = login(a.port, a.target, 0x800000005555, timeout=30)
    check("login", st == (0, 0), f"status={st}")
    if st != (0, 0):
        return 1
    waits_before = stats_sum(a.stats, "data_pool_waits")
    misses_before = stats_sum(a.stats, "data_pool_misses")
    reads_before = lun_reads(a.stats)
    last = FIRST_ITT + READS - 1
    statsn = take_unit_attention(s, statsn, cmdsn=1)
    # The reads, then ABORT TASK (immediate) for the last one: Referenced
    # Task Tag, CmdSN, ExpStatSN, RefCmdSN. One send, so that the target
    # reads them together and dispatches the abort while the pool is dry.
    reads = b"".join(rw10(READ10, FIRST_ITT + i, i * BLOCKS, cmdsn=i + 2, statsn=statsn)
                     for i in range(READS))
    abort = pdu(0x02, 0x81, TMF_ITT, {20: last, 24: READS + 2, 28: statsn + 1, 32: READS + 1})
    s.sendall(reads + abort)
    got = {}
    data = {}
    tmf_response = None
    s.settimeout(20)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            if tmf_response is not None and len(got) >= READS - 1:
                break
            bhs, seg = recv_pdu(s)
            op = bhs[0] & 0x3F
            itt = struct.unpack_from(">I", bhs, 16)[0]
            if op == 0x25:  # Data-In
                data[itt] = data.get(itt, 0) + len(seg)
                if bhs[1] & 0x01:
                    got[itt] = bhs[3]
            elif op == 0x21:  # SCSI Response
                got[itt] = bhs[3]
            elif op == 0x22:  # Task Management Function Response
                tmf_response = bhs[2]
    except (socket.timeout, EOFError) as e:
        print(f"reading responses stopped: {e!r}")
    check("abort-of-a-waiting-read-complete", tmf_response == 0, f"response={tmf_response}")
    check("aborted-read-has-no-response", last not in got)
    others = [FIRST_ITT + i for i in range(READS - 1)]
    good = [i for i in others if got.get(i) == 0 and data.get(i) == BLOCKS * 512]
    bad = [(i, got.get(i), data.get(i)) for i in others if i not in good]
    check("other-reads-complete-with-their-data", len(good) == len(others),
          f"{len(good)} of {len(others)}; not: {bad[:5]} (ITT, status, bytes)")
    check("connection-still-works", nop(s, 600, cmdsn=READS + 2) == b"hi")
    s.close()
    time.sleep(1.5)  # the stats file is rewritten every second
    waits = stats_sum(a.stats, "data_pool_waits") - waits_before
    misses = stats_sum(a.stats, "data_pool_misses") - misses_before
    check("reads-waited-for-buffers", waits > 0, f"waits={waits}")
    check("no-heap-buffers", misses == 0, f"misses={misses}")
    # The aborted read was ended while it waited: the device never ran it.
    ran = lun_reads(a.stats) - reads_before
    check("aborted-read-never-ran", ran == READS - 1, f"reads run by the LUN: {ran}")
    unsolicited_data_behind_waiting_writes(a, check)
    failed = results.count(False)
    print(f"buffer-waits: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


WRITES = 40
FIRST_BURST = 65536
SEG = 65536


def data_out(itt, ttt, datasn, offset, data, final, statsn):
    return pdu(0x05, 0x80 if final else 0, itt,
               {20: ttt, 28: statsn, 36: datasn, 40: offset}, data, imm=False)


def unsolicited_data_behind_waiting_writes(a, check):
    keys = (b"InitialR2T=No\0ImmediateData=No\0FirstBurstLength=65536\0"
            b"MaxBurstLength=262144\0")
    s, st, _, statsn = login(a.port, a.target, 0x800000006666, timeout=30, keys=keys)
    check("login-initialr2t-no", st == (0, 0), f"status={st}")
    if st != (0, 0):
        return
    statsn = take_unit_attention(s, statsn, cmdsn=1)
    waits_before = stats_sum(a.stats, "data_pool_waits")
    first = 2000
    pattern = {first + i: bytes([(i * 7 + 1) & 0xFF]) * (BLOCKS * 512) for i in range(WRITES)}
    # Every command first (F clear: unsolicited data follows), then each
    # one's first burst. The LBAs lie past the reads' range.
    for i in range(WRITES):
        s.sendall(rw10(WRITE10, first + i, (READS + i) * BLOCKS, cmdsn=i + 2, statsn=statsn))
    for i in range(WRITES):
        itt = first + i
        s.sendall(data_out(itt, 0xFFFFFFFF, 0, 0, pattern[itt][:FIRST_BURST], True, statsn + 1))
    status = {}
    s.settimeout(30)
    deadline = time.time() + 90
    try:
        while len(status) < WRITES and time.time() < deadline:
            bhs, _ = recv_pdu(s)
            op = bhs[0] & 0x3F
            itt = struct.unpack_from(">I", bhs, 16)[0]
            if op == 0x31:  # R2T: send what it asks for
                ttt, off, want = struct.unpack_from(">I", bhs, 20)[0], *struct.unpack_from(">II", bhs, 40)
                for n, o in enumerate(range(off, off + want, SEG)):
                    end = min(o + SEG, off + want)
                    s.sendall(data_out(itt, ttt, n, o, pattern[itt][o:end], end == off + want,
                                       statsn + 1))
            elif op == 0x21:
                status[itt] = bhs[3]
    except (socket.timeout, EOFError) as e:
        print(f"reading responses stopped: {e!r}")
    good = sum(1 for v in status.values() if v == 0)
    check("writes-with-unsolicited-data-complete", good == WRITES,
          f"{good} of {WRITES} GOOD, {len(status)} answered")
    # Idle for a few ticks (500 ms each): the connection gives its receive
    # ring back to the pool (rx_rings_released), and the read-backs below
    # are received into a new one.
    released_before = stats_sum(a.stats, "rx_rings_released")
    time.sleep(3)
    released = stats_sum(a.stats, "rx_rings_released") - released_before
    check("idle-connection-gives-its-ring-back", released >= 1, f"released={released}")
    # Three of them read back.
    same = 0
    for k, i in enumerate((0, WRITES // 2, WRITES - 1)):
        itt = 3000 + k
        s.sendall(rw10(READ10, itt, (READS + i) * BLOCKS, cmdsn=WRITES + 2 + k, statsn=statsn))
        got = b""
        try:
            while True:
                bhs, seg = recv_pdu(s)
                if struct.unpack_from(">I", bhs, 16)[0] != itt:
                    continue
                got += seg
                if bhs[0] & 0x3F == 0x21 or (bhs[0] & 0x3F == 0x25 and bhs[1] & 0x01):
                    break
        except (socket.timeout, EOFError):
            break
        same += got == pattern[first + i]
    check("written-data-reads-back", same == 3, f"{same} of 3")
    s.close()
    time.sleep(1.5)
    waits = stats_sum(a.stats, "data_pool_waits") - waits_before
    check("writes-waited-for-buffers", waits > 0, f"waits={waits}")


if __name__ == "__main__":
    sys.exit(main())

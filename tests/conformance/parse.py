#!/usr/bin/env python3
"""Parse the verbose log of `iscsi-test-cu -V` and count passed/failed/skipped tests.

Output format of iscsi-test-cu 1.19 (libiscsi-bin, CUnit 2.1-3 "basic" mode, -V),
as observed against tgt on loopback:

    Suite: Read10
      Test: Simple ...
        Test READ10 of 1-256 blocks at the start of the LUN
        Send READ10 (Expecting SUCCESS) LBA:0 blocks:1 ...
        [OK] READ10 returned SUCCESS NO SENSE(0x00) (null)(0x0000)
    passed
      Test: BeyondEol ...
        [FAILED] GET_LBA_STATUS successful but should have failed with ...
    FAILED
        1. test_get_lba_status_beyond_eol.c:52  - ...     (CUnit's assertion list)
      Test: UnmapSingle ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
    passed
      Test: LUNResetSimpleAsync ...passed    Send PRIN/READ_KEYS
    ...
    Run Summary:    Type  Total    Ran Passed Failed Inactive
                  suites     51     51    n/a      0        0
                   tests    230    230    221      9        0

The result token `passed` / `FAILED` is printed by CUnit either at the start of a
line or directly after the `...` of the test header, and other output may follow
it on the same line (suite teardown prints without a leading newline).
CUnit counts a skipped test as passed: a test is counted as *skipped* here when
its result is `passed` and its output contains at least one `[SKIPPED] reason`
line (the first reason is reported). A test whose result is missing (the suite
crashed or was killed) is counted as failed.

Usage:
    parse.py LOG [--variant NAME] [--skips tests/skips.md] [--known-failures FILE]
             [--expect-total N] [--json OUT]

Exit status: 0 when no test failed (other than --known-failures entries), every
observed skip is listed in the skips file (when given), and the log is complete;
1 otherwise; 2 on usage errors.
"""

import argparse
import json
import re
import sys

SUITE_RE = re.compile(r"^Suite: (\S+)")
TEST_RE = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
# result token: at line start, or right after the "..." of the test header
RESULT_RE = re.compile(r"^(passed|FAILED)\b")
SKIP_RE = re.compile(r"\[SKIPPED\]\s*(.*?)\s*$")
FAILMSG_RE = re.compile(r"\[FAILED\]\s*(.*?)\s*$")
ASSERT_RE = re.compile(r"^\s+\d+\. (\S+:\d+\s+- .*?)\s*$")  # CUnit's "1. file.c:45  - CU_ASSERT..."
CHECK_OK_RE = re.compile(r"\[(OK|SUCCESS)\]")
SUMMARY_TESTS_RE = re.compile(
    r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$"
)


def parse_log(text):
    """Return (tests, cunit_summary). tests: ordered list of dicts
    {name, result: passed|failed|skipped, reason}."""
    tests = []
    suite = None
    cur = None  # dict for the test being read
    summary = None

    def close(t):
        if t is None:
            return
        if t["raw"] is None:
            t["result"] = "failed"
            t["reason"] = "no result in log (suite aborted?)"
        elif t["raw"] == "FAILED":
            t["result"] = "failed"
            t["reason"] = t["fail_msgs"][0] if t["fail_msgs"] else ""
        elif t["skips"] and not t["checked_after_skip"]:
            t["result"] = "skipped"
            t["reason"] = t["skips"][0]
        elif t["skips"]:
            # a sub-step was skipped but the test went on and verified more
            # (e.g. Unmap.VPD: UNMAP unsupported, then checks LBPU is clear)
            t["result"] = "passed"
            t["reason"] = "partial skip: " + t["skips"][0]
        else:
            t["result"] = "passed"
            t["reason"] = ""
        tests.append(
            {"name": t["name"], "result": t["result"], "reason": t["reason"]}
        )

    for line in text.splitlines():
        m = SUMMARY_TESTS_RE.match(line)
        if m:
            summary = {
                "total": int(m.group(1)),
                "ran": int(m.group(2)),
                "passed": int(m.group(3)),
                "failed": int(m.group(4)),
                "inactive": int(m.group(5)),
            }
            continue
        if line.startswith("Run Summary:"):
            close(cur)
            cur = None
            continue
        m = SUITE_RE.match(line)
        if m:
            close(cur)
            cur = None
            suite = m.group(1)
            continue
        m = TEST_RE.match(line)
        if m:
            close(cur)
            cur = {
                "name": "%s.%s" % (suite, m.group(1)),
                "raw": None,
                "skips": [],
                "fail_msgs": [],
                "checked_after_skip": False,
            }
            rest = m.group(2)
            r = RESULT_RE.match(rest)
            if r:
                cur["raw"] = r.group(1)
            s = SKIP_RE.search(rest)
            if s:
                cur["skips"].append(s.group(1))
            continue
        if cur is None:
            continue
        if cur["raw"] == "FAILED" and not cur["fail_msgs"]:
            a = ASSERT_RE.match(line)
            if a:
                # drop output of the suite teardown glued to the same line
                cur["fail_msgs"].append(re.split(r"\s{4,}", a.group(1))[0])
            continue
        if cur["raw"] is None:
            r = RESULT_RE.match(line)
            if r:
                cur["raw"] = r.group(1)
                continue
            s = SKIP_RE.search(line)
            if s:
                cur["skips"].append(s.group(1))
                cur["checked_after_skip"] = False
                continue
            if cur["skips"] and CHECK_OK_RE.search(line):
                cur["checked_after_skip"] = True
                continue
            f = FAILMSG_RE.search(line)
            if f:
                cur["fail_msgs"].append(f.group(1))
    close(cur)
    return tests, summary


def read_skips_md(path):
    """Read a markdown table `| test name | reason |`; return {name: reason}.
    Header and separator rows are ignored; names look like Suite.Test."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("|"):
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) < 2:
                continue
            name = cells[0].strip("` ")
            if not re.match(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+$", name):
                continue  # header / separator / prose
            out[name] = cells[1]
    return out


def read_list(path):
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.add(line)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--variant", default="")
    ap.add_argument("--skips", help="markdown table of documented skips")
    ap.add_argument(
        "--known-failures",
        help="file of test names whose failure is tolerated (only for peers such as tgt)",
    )
    ap.add_argument("--expect-total", type=int, default=0)
    ap.add_argument("--json", help="write per-test results as JSON here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    try:
        with open(args.log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        print("parse.py: %s" % e, file=sys.stderr)
        return 2

    tests, summary = parse_log(text)
    tag = "conformance(%s)" % args.variant if args.variant else "conformance"
    problems = []

    passed = [t for t in tests if t["result"] == "passed"]
    failed = [t for t in tests if t["result"] == "failed"]
    skipped = [t for t in tests if t["result"] == "skipped"]

    known = read_list(args.known_failures) if args.known_failures else set()
    documented = read_skips_md(args.skips) if args.skips else None

    if not tests:
        problems.append("no test found in the log")
    if summary is None:
        problems.append("CUnit 'Run Summary' missing: the suite did not finish")
    else:
        if summary["ran"] != len(tests):
            problems.append(
                "CUnit ran %d tests but %d were parsed" % (summary["ran"], len(tests))
            )
        if summary["failed"] != len(failed):
            problems.append(
                "CUnit reports %d failed tests but %d were parsed"
                % (summary["failed"], len(failed))
            )
    if args.expect_total and len(tests) != args.expect_total:
        problems.append(
            "expected %d tests, parsed %d" % (args.expect_total, len(tests))
        )

    for t in failed:
        mark = " (known failure of this peer, tolerated)" if t["name"] in known else ""
        print("%s FAILED  %s: %s%s" % (tag, t["name"], t["reason"], mark))
    real_failures = [t for t in failed if t["name"] not in known]

    undocumented = []
    if documented is not None:
        for t in skipped:
            if t["name"] not in documented:
                undocumented.append(t)
                print(
                    "%s UNDOCUMENTED SKIP  %s: %s  (add it to tests/skips.md or fix it)"
                    % (tag, t["name"], t["reason"])
                )
        for t in passed:
            if t["name"] in documented:
                print(
                    "%s note: %s is listed in tests/skips.md but now passes: remove it"
                    % (tag, t["name"])
                )
        if undocumented:
            problems.append("%d skip(s) not listed in tests/skips.md" % len(undocumented))
    if not args.quiet:
        for t in skipped:
            print("%s skipped %s: %s" % (tag, t["name"], t["reason"]))
    if real_failures:
        problems.append("%d test(s) failed" % len(real_failures))
    for p in problems:
        print("%s problem: %s" % (tag, p))

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"variant": args.variant, "tests": tests, "cunit_summary": summary},
                f,
                indent=1,
            )

    print(
        "%s: %d passed, %d failed, %d skipped"
        % (tag, len(passed), len(failed), len(skipped))
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

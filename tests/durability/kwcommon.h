/*
 * Helpers shared by killwrite.c and killpr.c (header-only so the driver
 * compiles each program from one gcc line).
 */
#ifndef KWCOMMON_H
#define KWCOMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

static const char *g_prog = "kw";

static inline void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static inline void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", g_prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* A nonce no earlier run can have produced, so stale data never matches. */
static inline uint64_t random_nonce(void)
{
	uint64_t v = 0;
	int fd = open("/dev/urandom", O_RDONLY);
	if (fd < 0 || read(fd, &v, sizeof v) != (ssize_t)sizeof v)
		die("cannot read /dev/urandom");
	close(fd);
	return v ? v : 1;
}

static inline void describe(struct iscsi_context *iscsi, const char *what, struct scsi_task *t)
{
	if (t && t->status == SCSI_STATUS_CHECK_CONDITION)
		fprintf(stderr, "%s: %s: CHECK CONDITION %s (key 0x%x asc/ascq 0x%04x)\n", g_prog,
			what, scsi_sense_key_str(t->sense.key), t->sense.key, t->sense.ascq);
	else
		fprintf(stderr, "%s: %s: status 0x%x: %s\n", g_prog, what, t ? t->status : -1,
			iscsi_get_error(iscsi));
}

static inline struct iscsi_context *login(const char *url_text, const char *who, int *lun)
{
	char name[160];
	/* Writing to the dead target's socket must be an error to handle, not a
	 * SIGPIPE that kills us before the log is written. */
	signal(SIGPIPE, SIG_IGN);
	snprintf(name, sizeof name, "iqn.2026-11.io.target-rdma:%s", who);
	struct iscsi_context *iscsi = iscsi_create_context(name);
	if (!iscsi)
		die("iscsi_create_context failed");
	struct iscsi_url *url = iscsi_parse_full_url(iscsi, url_text);
	if (!url)
		die("bad URL %s: %s", url_text, iscsi_get_error(iscsi));
	iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE);
	iscsi_set_targetname(iscsi, url->target);
	/* A reconnect after the kill would hide the death and replay nothing we
	 * could account for. */
	iscsi_set_noautoreconnect(iscsi, 1);
	/* Bounds every *_sync call: a hung target must not hang the test. */
	iscsi_set_timeout(iscsi, 20);
	if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0)
		die("login to %s failed: %s", url_text, iscsi_get_error(iscsi));
	*lun = url->lun;
	iscsi_destroy_url(url);
	return iscsi;
}

/*
 * One command, synchronously. A unit attention (power on, mode parameters
 * changed by the other session) is a report, not a failure: retried a few
 * times. Returns the task (caller frees) with GOOD status, or NULL.
 */
static inline struct scsi_task *cmd_sync(struct iscsi_context *iscsi, int lun, const char *what,
				  unsigned char *cdb, int cdb_len, int dir, int xfer,
				  unsigned char *out, int out_len)
{
	for (int attempt = 0; attempt < 5; attempt++) {
		struct scsi_task *t = scsi_create_task(cdb_len, cdb, dir, xfer);
		if (!t)
			die("%s: scsi_create_task failed", what);
		struct iscsi_data d = {.size = (size_t)out_len, .data = out};
		struct scsi_task *r = iscsi_scsi_command_sync(iscsi, lun, t, out ? &d : NULL);
		if (r && r->status == SCSI_STATUS_GOOD)
			return r;
		int ua = r && r->status == SCSI_STATUS_CHECK_CONDITION &&
			 r->sense.key == SCSI_SENSE_UNIT_ATTENTION;
		if (!ua) {
			/* Without a task back, libiscsi may still own it: leak it, the
			 * caller exits. */
			describe(iscsi, what, r);
			if (r)
				scsi_free_scsi_task(r);
			return NULL;
		}
		scsi_free_scsi_task(r);
	}
	fprintf(stderr, "%s: %s: unit attention 5 times in a row\n", g_prog, what);
	return NULL;
}

#endif

/*
 * The write cache contract through a real initiator (libiscsi): an
 * initiator turns the cache off with MODE SELECT, every session then sees
 * WCE=0 (the others after a MODE PARAMETERS CHANGED unit attention), and
 * every plain WRITE from then on reaches the backstore as a durable write
 * before its GOOD: the LUN's `durable_writes` counter in the target's
 * stats file grows by exactly the writes made. With the cache on again it
 * does not grow.
 *
 *   write_cache URL STATS_FILE LUN_INDEX
 *
 * URL is iscsi://HOST:PORT/IQN/LUN of a LUN with a volatile cache (a file
 * LUN); STATS_FILE is the target's --stats-file; LUN_INDEX is the LUN's
 * place in its "luns" array. Prints `write-cache: N passed, N failed`.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define WRITES 128
#define WRITE_BLOCKS 128 /* 64 KiB of 512-byte blocks */

static int passed, failed;

static void check(int ok, const char *what)
{
	printf("%s  %s\n", ok ? "ok  " : "FAIL", what);
	if (ok)
		passed++;
	else
		failed++;
}

static struct iscsi_context *login(const char *url_s, const char *initiator)
{
	struct iscsi_context *c = iscsi_create_context(initiator);
	struct iscsi_url *url;
	if (!c)
		return NULL;
	url = iscsi_parse_full_url(c, url_s);
	if (!url) {
		fprintf(stderr, "bad URL %s: %s\n", url_s, iscsi_get_error(c));
		return NULL;
	}
	iscsi_set_targetname(c, url->target);
	iscsi_set_session_type(c, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(c, ISCSI_HEADER_DIGEST_NONE);
	if (iscsi_full_connect_sync(c, url->portal, url->lun) != 0) {
		fprintf(stderr, "login to %s: %s\n", url_s, iscsi_get_error(c));
		return NULL;
	}
	iscsi_destroy_url(url);
	return c;
}

/* Run a CDB; returns the task (caller frees) or NULL on transport error. */
static struct scsi_task *cmd(struct iscsi_context *c, int lun, unsigned char *cdb, int cdb_len,
			     int dir, int xfer, unsigned char *out)
{
	struct scsi_task *t = scsi_create_task(cdb_len, cdb, dir, xfer);
	struct iscsi_data d = {.size = dir == SCSI_XFER_WRITE ? xfer : 0, .data = out};
	if (!t)
		return NULL;
	if (!iscsi_scsi_command_sync(c, lun, t, dir == SCSI_XFER_WRITE ? &d : NULL)) {
		fprintf(stderr, "command %02x: %s\n", cdb[0], iscsi_get_error(c));
		return NULL;
	}
	return t;
}

/* The caching page by MODE SENSE(10), retried past unit attentions:
 * returns its WCE bit, -1 on failure; the whole page into page[20]. */
static int sense_wce(struct iscsi_context *c, int lun, unsigned char *page, int *ua_2a01)
{
	for (int i = 0; i < 4; i++) {
		unsigned char cdb[10] = {0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0};
		struct scsi_task *t = cmd(c, lun, cdb, 10, SCSI_XFER_READ, 255, NULL);
		if (!t)
			return -1;
		if (t->status == SCSI_STATUS_CHECK_CONDITION &&
		    t->sense.key == SCSI_SENSE_UNIT_ATTENTION) {
			if (ua_2a01 && t->sense.ascq == 0x2a01)
				*ua_2a01 = 1;
			scsi_free_scsi_task(t);
			continue;
		}
		if (t->status != SCSI_STATUS_GOOD || t->datain.size < 8 + 20) {
			scsi_free_scsi_task(t);
			return -1;
		}
		memcpy(page, t->datain.data + 8, 20);
		scsi_free_scsi_task(t);
		return (page[0] & 0x3f) == 0x08 ? (page[2] & 0x04) != 0 : -1;
	}
	return -1;
}

static int set_wce(struct iscsi_context *c, int lun, int on)
{
	unsigned char page[20], p[8 + 20] = {0};
	if (sense_wce(c, lun, page, NULL) < 0)
		return -1;
	memcpy(p + 8, page, 20);
	p[8] &= 0x3f; /* PS is reserved in MODE SELECT */
	p[8 + 2] = on ? (p[8 + 2] | 0x04) : (p[8 + 2] & ~0x04);
	unsigned char cdb[10] = {0x55, 0x10, 0, 0, 0, 0, 0, 0, sizeof p, 0};
	struct scsi_task *t = cmd(c, lun, cdb, 10, SCSI_XFER_WRITE, sizeof p, p);
	int ok = t && t->status == SCSI_STATUS_GOOD;
	if (t)
		scsi_free_scsi_task(t);
	return ok ? 0 : -1;
}

static int writes(struct iscsi_context *c, int lun, uint32_t lba0, int n)
{
	static unsigned char buf[WRITE_BLOCKS * 512];
	for (int i = 0; i < n; i++) {
		uint32_t lba = lba0 + (uint32_t)i * WRITE_BLOCKS;
		memset(buf, 0x40 + (i & 0x3f), sizeof buf);
		unsigned char cdb[10] = {0x2a, 0, lba >> 24, lba >> 16, lba >> 8, lba, 0,
					 WRITE_BLOCKS >> 8, WRITE_BLOCKS & 0xff, 0};
		struct scsi_task *t = cmd(c, lun, cdb, 10, SCSI_XFER_WRITE, sizeof buf, buf);
		if (t && t->status == SCSI_STATUS_CHECK_CONDITION &&
		    t->sense.key == SCSI_SENSE_UNIT_ATTENTION) {
			/* Another session changed the mode pages: say it again. */
			scsi_free_scsi_task(t);
			t = cmd(c, lun, cdb, 10, SCSI_XFER_WRITE, sizeof buf, buf);
		}
		int ok = t && t->status == SCSI_STATUS_GOOD;
		if (t)
			scsi_free_scsi_task(t);
		if (!ok)
			return -1;
	}
	return 0;
}

/* durable_writes of LUN `index` in the stats file, after its next
 * rewrite (once a second), so it covers everything done before the call. */
static long durable_writes(const char *stats, int index)
{
	static char text[1 << 20];
	usleep(2200 * 1000);
	FILE *f = fopen(stats, "r");
	if (!f)
		return -1;
	size_t n = fread(text, 1, sizeof text - 1, f);
	fclose(f);
	text[n] = 0;
	char *p = strstr(text, "\"luns\"");
	for (int i = 0; p && i <= index; i++) {
		p = strstr(p + 1, "\"durable_writes\":");
		/* Each LUN entry has one io object with one durable_writes. */
	}
	return p ? strtol(p + strlen("\"durable_writes\":"), NULL, 10) : -1;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s URL STATS_FILE LUN_INDEX\n", argv[0]);
		return 2;
	}
	const char *url = argv[1], *stats = argv[2];
	int index = atoi(argv[3]);
	struct iscsi_context *a = login(url, "iqn.2026-12.io.target-rdma:wce-a");
	struct iscsi_context *b = login(url, "iqn.2026-12.io.target-rdma:wce-b");
	if (!a || !b) {
		printf("write-cache: 0 passed, 1 failed\n");
		return 1;
	}
	struct iscsi_url *u = iscsi_parse_full_url(a, url);
	int lun = u ? u->lun : 0;
	unsigned char page[20];
	int ua = 0;

	check(sense_wce(a, lun, page, NULL) == 1, "the file LUN starts with WCE=1");
	check(sense_wce(b, lun, page, NULL) == 1, "second session: WCE=1");
	long d0 = durable_writes(stats, index);
	check(d0 >= 0, "durable_writes in the stats file");
	check(writes(a, lun, 0, WRITES) == 0, "128 writes of 64 KiB with WCE=1");
	long d1 = durable_writes(stats, index);
	printf("      durable_writes %ld -> %ld\n", d0, d1);
	check(d1 == d0, "WCE=1: plain writes are not made durable one by one");

	check(set_wce(a, lun, 0) == 0, "MODE SELECT(10) WCE=0");
	check(sense_wce(a, lun, page, NULL) == 0, "MODE SENSE: WCE=0 on the session that set it");
	check(sense_wce(b, lun, page, &ua) == 0, "MODE SENSE: WCE=0 on the other session");
	check(ua, "the other session got MODE PARAMETERS CHANGED (2Ah/01h)");
	check(writes(a, lun, 0, WRITES) == 0 && writes(b, lun, WRITES * WRITE_BLOCKS, 32) == 0,
	      "128 + 32 writes with WCE=0");
	long d2 = durable_writes(stats, index);
	printf("      durable_writes %ld -> %ld (writes made: %d)\n", d1, d2, WRITES + 32);
	check(d2 - d1 == WRITES + 32, "WCE=0: every write made durable before its GOOD");

	check(set_wce(b, lun, 1) == 0, "MODE SELECT(10) WCE=1 again");
	check(writes(a, lun, 0, 32) == 0, "32 writes with WCE=1");
	long d3 = durable_writes(stats, index);
	check(d3 == d2, "WCE=1: back to the cache");

	iscsi_logout_sync(a);
	iscsi_logout_sync(b);
	printf("write-cache: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}

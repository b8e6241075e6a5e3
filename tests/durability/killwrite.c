/*
 * killwrite: keep DEPTH stamped WRITE(16)s in flight against an iSCSI LUN and
 * SIGKILL the target the moment the K-th GOOD arrives, then log every write
 * so `check` can tell which acknowledged writes survived.
 *
 * usage: killwrite [-r ROUND] [-b WRITE_BYTES] [-t SECONDS] URL MODE PID K|KMIN-KMAX DEPTH LOG
 *
 *   MODE wce0  clear WCE with MODE SELECT(10) first; every GOOD write must survive
 *        fua   FUA on every write; every GOOD write must survive
 *        sync  SYNCHRONIZE CACHE(10) after every 8 GOOD writes; a write GOOD
 *              before a SYNC was sent must survive once that SYNC is GOOD
 *        none  WCE as the target has it, no FUA, no sync: nothing promised
 *              (the control that shows loss can be seen)
 *   PID        the target process, killed by this program with SIGKILL
 *   K          kill at the K-th GOOD write; KMIN-KMAX picks K at random
 *   -t         give up (exit 1) if K GOODs take longer than this (default 60)
 *
 * Every write goes to its own range (never rewritten in a run) and every
 * 512-byte unit of it holds a 64-byte record repeated: magic, nonce, round,
 * seq, LBA, unit index, blocks. A unit from another write, an older run or a
 * partial write cannot match; `check` rebuilds the records from the log.
 *
 * Log: a header line "# killwrite key=value ..." then one line a write:
 *   seq lba blocks nonce acked must_survive after_kill
 * (after_kill 1: its GOOD was read after kill() returned; a GOOD is a promise
 * whenever it was sent, so it counts the same).
 *
 * Exit 0: K GOODs seen and no error status before the kill. Errors after the
 * kill are the kill's doing and ignored.
 */
#include <signal.h>
#include <sys/types.h>

#include "kwcommon.h"

enum mode { M_WCE0, M_FUA, M_SYNC, M_NONE };
static const char *mode_names[] = {"wce0", "fua", "sync", "none"};

#define SYNC_EVERY 8
#define UNIT 512

struct wr {
	uint64_t lba;
	unsigned char acked, must, after_kill, sent;
};

struct slot {
	unsigned char *buf;
	uint32_t seq;
};

struct sync_req {
	uint32_t acked_before; /* how many of ack_order[] it covers */
};

static struct {
	enum mode mode;
	struct iscsi_context *iscsi;
	int lun;
	uint32_t bs, blocks_per_write, wbytes;
	uint64_t nonce;
	uint32_t round;
	pid_t pid;
	uint32_t k, depth, nwrites;
	struct wr *w;
	uint64_t *perm;
	uint32_t next_seq;
	uint32_t *ack_order, nacked, nacked_before_kill;
	uint32_t inflight, syncs_inflight, acks_since_sync;
	uint32_t syncs_sent, syncs_good;
	int killed, errors;
	uint64_t t_kill_ns, t_last_good_ns, kill_delay_ns;
	uint32_t inflight_at_kill;
	int wce_seen;
} g;

static void fill(unsigned char *buf, uint32_t seq, uint64_t lba)
{
	for (uint32_t u = 0; u < g.wbytes / UNIT; u++) {
		unsigned char rec[64];
		uint32_t blocks = g.blocks_per_write;
		memcpy(rec, "KILLWRT1", 8);
		memcpy(rec + 8, &g.nonce, 8);
		memcpy(rec + 16, &g.round, 4);
		memcpy(rec + 20, &seq, 4);
		memcpy(rec + 24, &lba, 8);
		memcpy(rec + 32, &u, 4);
		memcpy(rec + 36, &blocks, 4);
		/* the rest: nonce, seq, LBA again, so no byte of a unit is free */
		memcpy(rec + 40, &g.nonce, 8);
		uint64_t s64 = seq;
		memcpy(rec + 48, &s64, 8);
		memcpy(rec + 56, &lba, 8);
		for (int r = 0; r < UNIT / 64; r++)
			memcpy(buf + (size_t)u * UNIT + (size_t)r * 64, rec, 64);
	}
}

static void write_cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv);
static void sync_cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv);

static int submit(struct slot *sl)
{
	if (g.killed || g.next_seq >= g.nwrites || g.nacked >= g.k)
		return -1;
	uint32_t seq = g.next_seq++;
	struct wr *w = &g.w[seq];
	w->lba = g.perm[seq] * g.blocks_per_write;
	sl->seq = seq;
	fill(sl->buf, seq, w->lba);
	struct scsi_task *t = iscsi_write16_task(g.iscsi, g.lun, w->lba, sl->buf, g.wbytes, (int)g.bs,
						 0, 0, g.mode == M_FUA, 0, 0, write_cb, sl);
	if (!t) {
		describe(g.iscsi, "queue WRITE(16)", NULL);
		g.errors++;
		return -1;
	}
	w->sent = 1;
	g.inflight++;
	return 0;
}

static void submit_sync(void)
{
	unsigned char cdb[10] = {0x35}; /* SYNCHRONIZE CACHE(10), whole LUN */
	struct sync_req *sr = malloc(sizeof *sr);
	if (!sr)
		die("out of memory");
	/* Only writes already GOOD when the SYNC leaves are covered by it. */
	sr->acked_before = g.nacked;
	struct scsi_task *t = scsi_create_task(10, cdb, SCSI_XFER_NONE, 0);
	if (!t || iscsi_scsi_command_async(g.iscsi, g.lun, t, sync_cb, NULL, sr) != 0) {
		describe(g.iscsi, "queue SYNCHRONIZE CACHE(10)", NULL);
		g.errors++;
		free(sr);
		return;
	}
	g.syncs_sent++;
	g.syncs_inflight++;
}

static void do_kill(void)
{
	g.inflight_at_kill = g.inflight;
	if (kill(g.pid, SIGKILL) != 0) {
		perror("killwrite: kill");
		g.errors++;
	}
	g.t_kill_ns = now_ns();
	g.kill_delay_ns = g.t_kill_ns - g.t_last_good_ns;
	g.killed = 1;
	g.nacked_before_kill = g.nacked;
}

static void write_cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv)
{
	struct slot *sl = priv;
	struct scsi_task *t = command_data;
	struct wr *w = &g.w[sl->seq];
	(void)iscsi;

	g.inflight--;
	if (status == SCSI_STATUS_GOOD) {
		w->acked = 1;
		w->after_kill = (unsigned char)g.killed;
		if (g.mode == M_WCE0 || g.mode == M_FUA)
			w->must = 1;
		g.ack_order[g.nacked++] = sl->seq;
		g.acks_since_sync++;
		g.t_last_good_ns = now_ns();
	} else if (!g.killed) {
		char what[64];
		snprintf(what, sizeof what, "WRITE(16) seq %u LBA %" PRIu64, sl->seq, w->lba);
		describe(g.iscsi, what, t);
		g.errors++;
	}
	if (t)
		scsi_free_scsi_task(t);
	if (g.killed || g.errors)
		return;
	if (g.nacked >= g.k) {
		/* Now, before anything else, so the kill lands with the rest in flight. */
		do_kill();
		return;
	}
	if (g.mode == M_SYNC && g.acks_since_sync >= SYNC_EVERY) {
		g.acks_since_sync = 0;
		submit_sync();
	}
	submit(sl);
}

static void sync_cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv)
{
	struct sync_req *sr = priv;
	struct scsi_task *t = command_data;
	(void)iscsi;

	g.syncs_inflight--;
	if (status == SCSI_STATUS_GOOD) {
		g.syncs_good++;
		for (uint32_t i = 0; i < sr->acked_before; i++)
			g.w[g.ack_order[i]].must = 1;
	} else if (!g.killed) {
		describe(g.iscsi, "SYNCHRONIZE CACHE(10)", t);
		g.errors++;
	}
	if (t)
		scsi_free_scsi_task(t);
	free(sr);
}

/* The caching page's current (pc 0) or changeable (pc 1) values; the page
 * starts at buf[8] (DBD: no block descriptors). */
static int caching_page(struct iscsi_context *iscsi, int lun, int pc, unsigned char *page)
{
	unsigned char cdb[10] = {0x5a, 0x08, (unsigned char)(pc << 6 | 0x08), 0, 0, 0, 0, 0, 255, 0};
	struct scsi_task *t = cmd_sync(iscsi, lun, "MODE SENSE(10) caching page", cdb, 10,
				       SCSI_XFER_READ, 255, NULL, 0);
	if (!t)
		return -1;
	int n = t->datain.size;
	int bdl = n >= 8 ? (t->datain.data[6] << 8 | t->datain.data[7]) : 0;
	int at = 8 + bdl;
	if (n < at + 20 || (t->datain.data[at] & 0x3f) != 0x08 || t->datain.data[at + 1] != 0x12) {
		fprintf(stderr, "killwrite: MODE SENSE(10): no caching page in %d bytes\n", n);
		scsi_free_scsi_task(t);
		return -1;
	}
	memcpy(page, t->datain.data + at, 20);
	scsi_free_scsi_task(t);
	return 0;
}

static void clear_wce(const char *url)
{
	unsigned char cur[20], chg[20];
	if (caching_page(g.iscsi, g.lun, 0, cur) != 0 || caching_page(g.iscsi, g.lun, 1, chg) != 0)
		die("cannot read the caching mode page");
	if (cur[2] & 0x04) {
		if (!(chg[2] & 0x04))
			die("WCE is set and not changeable: this LUN cannot run mode wce0");
		unsigned char par[28] = {0};
		memcpy(par + 8, cur, 20);
		par[8] &= 0x7f; /* PS is reserved in MODE SELECT */
		par[8 + 2] &= (unsigned char)~0x04;
		unsigned char cdb[10] = {0x55, 0x10, 0, 0, 0, 0, 0, 0, sizeof par, 0}; /* PF=1 SP=0 */
		struct scsi_task *t = cmd_sync(g.iscsi, g.lun, "MODE SELECT(10) WCE=0", cdb, 10,
					       SCSI_XFER_WRITE, sizeof par, par, sizeof par);
		if (!t)
			die("MODE SELECT(10) clearing WCE failed");
		scsi_free_scsi_task(t);
	}
	if (caching_page(g.iscsi, g.lun, 0, cur) != 0)
		die("cannot read the caching mode page after MODE SELECT");
	if (cur[2] & 0x04)
		die("MODE SELECT(10) WCE=0 was GOOD but MODE SENSE still reports WCE=1");
	/* The cache setting belongs to the LUN, not the session that set it. */
	int lun2;
	char who[64];
	snprintf(who, sizeof who, "killwrite-check-%d", (int)getpid());
	struct iscsi_context *other = login(url, who, &lun2);
	if (caching_page(other, lun2, 0, cur) != 0)
		die("second session: cannot read the caching mode page");
	if (cur[2] & 0x04)
		die("second session: MODE SENSE reports WCE=1 after the first session cleared it");
	iscsi_logout_sync(other);
	iscsi_destroy_context(other);
}

static void usage(void)
{
	fprintf(stderr, "usage: killwrite [-r ROUND] [-b WRITE_BYTES] [-t SECONDS] URL wce0|fua|sync|none "
			"PID K|KMIN-KMAX DEPTH LOG\n");
	exit(2);
}

static void write_log(const char *path, double seconds)
{
	FILE *f = fopen(path, "w");
	if (!f)
		die("cannot create %s", path);
	uint32_t must = 0, sent = 0;
	for (uint32_t i = 0; i < g.nwrites; i++) {
		must += g.w[i].must;
		sent += g.w[i].sent;
	}
	fprintf(f,
		"# killwrite mode=%s round=%u nonce=%016" PRIx64 " block=%u write_bytes=%u k=%u depth=%u "
		"sent=%u acked=%u acked_before_kill=%u must_survive=%u inflight_at_kill=%u "
		"syncs_sent=%u syncs_good=%u wce=%d kill_after_last_good_us=%.1f seconds=%.3f errors=%d\n",
		mode_names[g.mode], g.round, g.nonce, g.bs, g.wbytes, g.k, g.depth, sent, g.nacked,
		g.nacked_before_kill, must, g.inflight_at_kill, g.syncs_sent, g.syncs_good, g.wce_seen,
		g.killed ? (double)g.kill_delay_ns / 1e3 : -1.0, seconds, g.errors);
	for (uint32_t i = 0; i < g.nwrites; i++) {
		const struct wr *w = &g.w[i];
		if (w->sent)
			fprintf(f, "%u %" PRIu64 " %u %016" PRIx64 " %d %d %d\n", i, w->lba,
				g.blocks_per_write, g.nonce, w->acked, w->must, w->after_kill);
	}
	if (fclose(f) != 0)
		die("writing %s failed", path);
}

int main(int argc, char **argv)
{
	int opt;
	double limit_s = 60;
	g_prog = "killwrite";
	g.wbytes = 8192;
	while ((opt = getopt(argc, argv, "r:b:t:")) != -1) {
		switch (opt) {
		case 'r': g.round = (uint32_t)strtoul(optarg, NULL, 0); break;
		case 'b': g.wbytes = (uint32_t)strtoul(optarg, NULL, 0); break;
		case 't': limit_s = atof(optarg); break;
		default: usage();
		}
	}
	if (argc - optind != 6)
		usage();
	const char *url = argv[optind];
	const char *mode = argv[optind + 1];
	g.pid = (pid_t)atoi(argv[optind + 2]);
	const char *kspec = argv[optind + 3];
	g.depth = (uint32_t)atoi(argv[optind + 4]);
	const char *logpath = argv[optind + 5];
	for (g.mode = M_WCE0; g.mode <= M_NONE; g.mode++)
		if (strcmp(mode, mode_names[g.mode]) == 0)
			break;
	if (g.mode > M_NONE)
		usage();
	if (g.pid <= 1 || g.depth < 1 || g.depth > 256 || g.wbytes < UNIT || g.wbytes % UNIT)
		usage();

	g.nonce = random_nonce();
	uint64_t rng = g.nonce;
	unsigned kmin, kmax;
	if (sscanf(kspec, "%u-%u", &kmin, &kmax) == 2 && kmin >= 1 && kmax >= kmin)
		g.k = kmin + (uint32_t)(xorshift(&rng) % (kmax - kmin + 1));
	else if ((g.k = (uint32_t)atoi(kspec)) < 1)
		usage();

	char who[64];
	snprintf(who, sizeof who, "killwrite-%d", (int)getpid());
	g.iscsi = login(url, who, &g.lun);
	unsigned char rc16[16] = {0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0};
	struct scsi_task *t = cmd_sync(g.iscsi, g.lun, "READ CAPACITY(16)", rc16, 16,
				       SCSI_XFER_READ, 32, NULL, 0);
	struct scsi_readcapacity16 *rc = t ? scsi_datain_unmarshall(t) : NULL;
	if (!rc)
		die("READ CAPACITY(16) failed");
	g.bs = rc->block_length;
	uint64_t nblocks = rc->returned_lba + 1;
	scsi_free_scsi_task(t);
	if (g.bs == 0 || g.wbytes % g.bs)
		die("write size %u is not a multiple of the block size %u", g.wbytes, g.bs);
	g.blocks_per_write = g.wbytes / g.bs;
	uint64_t nslots = nblocks / g.blocks_per_write;
	/* every write its own range: K GOODs plus what is in flight at the kill */
	g.nwrites = g.k + g.depth;
	if (g.nwrites > nslots)
		die("LUN too small: %u writes of %u bytes need %" PRIu64 " slots, it has %" PRIu64,
		    g.nwrites, g.wbytes, (uint64_t)g.nwrites, nslots);

	if (g.mode == M_WCE0)
		clear_wce(url);
	unsigned char page[20];
	if (caching_page(g.iscsi, g.lun, 0, page) != 0)
		die("cannot read the caching mode page");
	g.wce_seen = !!(page[2] & 0x04);

	/* Ranges in random order, so the backend sees scattered I/O, not a stream. */
	g.perm = calloc(nslots, sizeof *g.perm);
	g.w = calloc(g.nwrites, sizeof *g.w);
	g.ack_order = calloc(g.nwrites, sizeof *g.ack_order);
	struct slot *slots = calloc(g.depth, sizeof *slots);
	if (!g.perm || !g.w || !g.ack_order || !slots)
		die("out of memory");
	for (uint64_t i = 0; i < nslots; i++)
		g.perm[i] = i;
	for (uint64_t i = nslots - 1; i > 0; i--) {
		uint64_t j = xorshift(&rng) % (i + 1), x = g.perm[i];
		g.perm[i] = g.perm[j];
		g.perm[j] = x;
	}
	for (uint32_t i = 0; i < g.depth; i++)
		if (posix_memalign((void **)&slots[i].buf, 4096, g.wbytes) != 0)
			die("out of memory");

	uint64_t t0 = now_ns();
	uint64_t deadline = t0 + (uint64_t)(limit_s * 1e9);
	for (uint32_t i = 0; i < g.depth; i++)
		if (submit(&slots[i]) != 0)
			break;
	/* Before the kill: until K GOODs. After it: read what the dead target had
	 * already sent, until the connection drops, for at most 5 s. */
	while (!g.errors && (g.inflight > 0 || g.syncs_inflight > 0)) {
		uint64_t now = now_ns();
		if (!g.killed && now > deadline) {
			fprintf(stderr, "killwrite: %u GOODs of %u after %.0f s, giving up\n", g.nacked,
				g.k, limit_s);
			g.errors++;
			break;
		}
		if (g.killed && now > g.t_kill_ns + 5000000000ull)
			break;
		struct pollfd pfd = {.fd = iscsi_get_fd(g.iscsi), .events = iscsi_which_events(g.iscsi)};
		int r = poll(&pfd, 1, 200);
		if (r < 0 && errno != EINTR) {
			perror("killwrite: poll");
			g.errors++;
			break;
		}
		if (r <= 0)
			continue;
		if (iscsi_service(g.iscsi, pfd.revents) < 0) {
			if (!g.killed) {
				fprintf(stderr, "killwrite: connection lost before the kill: %s\n",
					iscsi_get_error(g.iscsi));
				g.errors++;
			}
			break;
		}
		if (g.killed && pfd.revents & (POLLERR | POLLHUP) && !(pfd.revents & POLLIN))
			break;
	}
	if (!g.killed && !g.errors) {
		fprintf(stderr, "killwrite: ran out of writes before K=%u GOODs\n", g.k);
		g.errors++;
	}
	if (!g.killed) {
		g.t_last_good_ns = now_ns();
		do_kill(); /* a failed run still must not leave the target running */
	}
	write_log(logpath, (double)(now_ns() - t0) / 1e9);
	/* No logout: the target is dead; the context goes with the process. */
	return g.errors ? 1 : 0;
}

/*
 * iobench: a small iSCSI load generator on libiscsi's asynchronous API.
 *
 * Used by benches/compare-tgt.sh to drive target-rdma and tgt with exactly the
 * same client.  Build:  cc -O2 -o iobench benches/iobench.c -liscsi -lpthread
 *
 * usage: iobench [-m read|write|fill|verify|unmap] [-p rand|seq] [-b BYTES] [-q QD]
 *                [-t SECONDS] [-s SESSIONS] [-n] [-I] URL [URL...]
 *
 *   -m  read, write, fill (write the whole LUN once, sequentially, then stop),
 *       or verify: VERIFY(16) with BYTCHK=11b, which sends one block and has
 *       the target compare every block of the range with it; the block sent
 *       is zeros, so run it on a LUN never written (it reads as zeros).  The
 *       target's work per command grows with the range, the client's does
 *       not: a load that a target on few cores cannot pass to its client.
 *       Or unmap: UNMAP of each I/O's range as one block descriptor (a
 *       thin-provisioned LUN).
 *   -p  rand (offsets uniformly random, aligned to the I/O size) or seq
 *   -b  I/O size in bytes (multiple of the LUN's logical block size)
 *   -q  commands in flight per session
 *   -t  seconds to run (read/write); no new I/O is issued after that, the
 *       in-flight ones are drained and counted
 *   -s  sessions, one thread and one iSCSI session (own initiator name) each;
 *       with several URLs, session i uses URL i mod (number of URLs)
 *   -n  do not verify read data
 *   -I  offer ImmediateData=No and InitialR2T=Yes: every write's data then
 *       goes in Data-Out PDUs answering the target's R2Ts (as initiators
 *       configured so do), not with the command
 *
 * Every write stamps the first 8 bytes of each logical block with that
 * block's LBA; every read checks the stamp (so run "fill" first).  Any SCSI
 * status other than GOOD, a short transfer, a stamp mismatch or a dropped
 * connection makes the exit status non-zero.
 *
 * Output: with more than one session, first one line per session
 *   SESSION idx=I url=URL ios=N errors=N
 * then one line
 *   RESULT ios=N bytes=N seconds=S iops=X mbps=X lat_mean_us=X lat_p50_us=X
 *          lat_p99_us=X lat_max_us=X errors=N
 * (mbps is 10^6 bytes per second).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define HIST_US 1000000 /* 1 us buckets up to 1 s, then one overflow bucket */

enum mode { M_READ, M_WRITE, M_FILL, M_VERIFY, M_UNMAP };

static enum mode g_mode = M_READ;
static int g_random = 1;
static uint32_t g_bs = 4096;
static int g_qd = 1;
static double g_seconds = 10;
static int g_sessions = 1;
static int g_verify = 1;
static int g_no_immediate;
static char **g_urls;
static int g_nurls;

struct session;

struct slot {
	struct session *s;
	unsigned char *buf;
	uint64_t lba;
	uint64_t t0_ns;
};

struct session {
	int idx;
	pthread_t th;
	struct iscsi_context *iscsi;
	int lun;
	uint32_t lbsize;      /* logical block size */
	uint64_t nblocks;     /* logical blocks on the LUN */
	uint32_t per_io;      /* logical blocks per I/O */
	uint64_t nslots_lun;  /* I/O-sized slots on the LUN */
	uint64_t seq_next;    /* next I/O slot, sequential pattern */
	uint64_t seq_end;     /* fill: stop here */
	uint64_t rng;
	uint64_t deadline_ns;
	int stop;
	int inflight;
	struct slot *slots;
	unsigned char *zero_block; /* verify: the block every block is compared with */
	/* results */
	uint64_t ios, bytes, lat_sum_ns, lat_max_ns, errors;
	uint32_t *hist;
	uint64_t t_start_ns, t_end_ns;
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static void fail(struct session *s, const char *what, struct scsi_task *t)
{
	s->errors++;
	s->stop = 1;
	if (t && t->status == SCSI_STATUS_CHECK_CONDITION)
		fprintf(stderr, "iobench[%d]: %s: CHECK CONDITION %s (key 0x%x asc/ascq 0x%04x)\n",
			s->idx, what, scsi_sense_key_str(t->sense.key), t->sense.key,
			t->sense.ascq);
	else
		fprintf(stderr, "iobench[%d]: %s: status 0x%x: %s\n", s->idx, what,
			t ? t->status : -1, iscsi_get_error(s->iscsi));
}

static void stamp(struct session *s, unsigned char *buf, uint64_t lba)
{
	for (uint32_t i = 0; i < s->per_io; i++)
		memcpy(buf + (size_t)i * s->lbsize, &(uint64_t){lba + i}, 8);
}

static int check(struct session *s, const unsigned char *buf, uint64_t lba)
{
	for (uint32_t i = 0; i < s->per_io; i++) {
		uint64_t v;
		memcpy(&v, buf + (size_t)i * s->lbsize, 8);
		if (v != lba + i) {
			fprintf(stderr,
				"iobench[%d]: data mismatch at LBA %" PRIu64 ": stamp %" PRIu64
				" (was the LUN filled first?)\n",
				s->idx, lba + i, v);
			return -1;
		}
	}
	return 0;
}

static void cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv);

/* Issue one I/O on this slot; returns 0 if one was issued. */
static int submit(struct slot *sl)
{
	struct session *s = sl->s;
	uint64_t io;
	struct scsi_task *t;

	if (s->stop)
		return -1;
	if (g_mode == M_FILL) {
		if (s->seq_next >= s->seq_end)
			return -1;
		io = s->seq_next++;
	} else if (g_random) {
		io = xorshift(&s->rng) % s->nslots_lun;
	} else {
		io = s->seq_next++;
		if (s->seq_next >= s->nslots_lun)
			s->seq_next = 0;
	}
	sl->lba = io * s->per_io;
	sl->t0_ns = now_ns();
	if (g_mode == M_READ) {
		t = iscsi_read16_task(s->iscsi, s->lun, sl->lba, g_bs, s->lbsize, 0, 0, 0, 0, 0,
				      cb, sl);
		if (t && scsi_task_add_data_in_buffer(t, g_bs, sl->buf) != 0) {
			fail(s, "add data-in buffer", NULL);
			return -1;
		}
	} else if (g_mode == M_VERIFY) {
		unsigned char cdb[16] = {0x8f, 3 << 1}; /* VERIFY(16), BYTCHK=11b */
		struct iscsi_data d = {.size = s->lbsize, .data = s->zero_block};
		for (int i = 0; i < 8; i++)
			cdb[2 + i] = (unsigned char)(sl->lba >> (56 - 8 * i));
		for (int i = 0; i < 4; i++)
			cdb[10 + i] = (unsigned char)(s->per_io >> (24 - 8 * i));
		t = scsi_create_task(16, cdb, SCSI_XFER_WRITE, (int)s->lbsize);
		if (t && iscsi_scsi_command_async(s->iscsi, s->lun, t, cb, &d, sl) != 0) {
			scsi_free_scsi_task(t);
			t = NULL;
		}
	} else if (g_mode == M_UNMAP) {
		/* UNMAP, parameter list: header and one block descriptor */
		unsigned char cdb[10] = {0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0};
		unsigned char *p = sl->buf;
		memset(p, 0, 24);
		p[1] = 22;
		p[3] = 16;
		for (int i = 0; i < 8; i++)
			p[8 + i] = (unsigned char)(sl->lba >> (56 - 8 * i));
		for (int i = 0; i < 4; i++)
			p[16 + i] = (unsigned char)(s->per_io >> (24 - 8 * i));
		struct iscsi_data d = {.size = 24, .data = p};
		t = scsi_create_task(10, cdb, SCSI_XFER_WRITE, 24);
		if (t && iscsi_scsi_command_async(s->iscsi, s->lun, t, cb, &d, sl) != 0) {
			scsi_free_scsi_task(t);
			t = NULL;
		}
	} else {
		stamp(s, sl->buf, sl->lba);
		t = iscsi_write16_task(s->iscsi, s->lun, sl->lba, sl->buf, g_bs, s->lbsize, 0, 0,
				       0, 0, 0, cb, sl);
	}
	if (!t) {
		fail(s, "queue command", NULL);
		return -1;
	}
	s->inflight++;
	return 0;
}

static void cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv)
{
	struct slot *sl = priv;
	struct session *s = sl->s;
	struct scsi_task *t = command_data;
	uint64_t t1 = now_ns();
	(void)iscsi;

	s->inflight--;
	if (status != SCSI_STATUS_GOOD) {
		fail(s, g_mode == M_READ     ? "READ(16)"
			: g_mode == M_VERIFY ? "VERIFY(16)"
			: g_mode == M_UNMAP  ? "UNMAP"
					     : "WRITE(16)",
		     t);
	} else if (t->residual_status != SCSI_RESIDUAL_NO_RESIDUAL && t->residual != 0) {
		fprintf(stderr, "iobench[%d]: residual %zu on LBA %" PRIu64 "\n", s->idx,
			t->residual, sl->lba);
		s->errors++;
		s->stop = 1;
	} else if (g_mode == M_READ && g_verify && check(s, sl->buf, sl->lba) != 0) {
		s->errors++;
		s->stop = 1;
	} else {
		uint64_t lat = t1 - sl->t0_ns;
		uint64_t us = lat / 1000;
		s->ios++;
		s->bytes += g_bs;
		s->lat_sum_ns += lat;
		if (lat > s->lat_max_ns)
			s->lat_max_ns = lat;
		s->hist[us < HIST_US ? us : HIST_US]++;
	}
	if (t)
		scsi_free_scsi_task(t);
	if (g_mode != M_FILL && t1 >= s->deadline_ns)
		s->stop = 1;
	submit(sl);
}

static void *run(void *arg)
{
	struct session *s = arg;
	char name[256];
	struct iscsi_url *url;
	struct scsi_task *t;
	struct scsi_readcapacity16 *rc;

	snprintf(name, sizeof name, "iqn.2026-11.io.target-rdma:iobench-%d-%d", (int)getpid(),
		 s->idx);
	s->iscsi = iscsi_create_context(name);
	if (!s->iscsi) {
		fprintf(stderr, "iobench: iscsi_create_context failed\n");
		s->errors++;
		return NULL;
	}
	const char *url_text = g_urls[s->idx % g_nurls];
	url = iscsi_parse_full_url(s->iscsi, url_text);
	if (!url) {
		fprintf(stderr, "iobench: bad URL %s: %s\n", url_text, iscsi_get_error(s->iscsi));
		s->errors++;
		return NULL;
	}
	iscsi_set_session_type(s->iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(s->iscsi, ISCSI_HEADER_DIGEST_NONE);
	iscsi_set_targetname(s->iscsi, url->target);
	iscsi_set_noautoreconnect(s->iscsi, 1);
	if (g_no_immediate) {
		iscsi_set_immediate_data(s->iscsi, ISCSI_IMMEDIATE_DATA_NO);
		iscsi_set_initial_r2t(s->iscsi, ISCSI_INITIAL_R2T_YES);
	}
	if (url->user[0])
		iscsi_set_initiator_username_pwd(s->iscsi, url->user, url->passwd);
	s->lun = url->lun;
	if (iscsi_full_connect_sync(s->iscsi, url->portal, url->lun) != 0) {
		fprintf(stderr, "iobench[%d]: login to %s failed: %s\n", s->idx, url->portal,
			iscsi_get_error(s->iscsi));
		iscsi_destroy_url(url);
		s->errors++;
		return NULL;
	}
	iscsi_destroy_url(url);

	t = iscsi_readcapacity16_sync(s->iscsi, s->lun);
	if (!t || t->status != SCSI_STATUS_GOOD || !(rc = scsi_datain_unmarshall(t))) {
		fprintf(stderr, "iobench[%d]: READ CAPACITY(16) failed: %s\n", s->idx,
			iscsi_get_error(s->iscsi));
		s->errors++;
		return NULL;
	}
	s->lbsize = rc->block_length;
	s->nblocks = rc->returned_lba + 1;
	scsi_free_scsi_task(t);
	if (g_bs % s->lbsize != 0 || g_bs < s->lbsize) {
		fprintf(stderr, "iobench: I/O size %u is not a multiple of the block size %u\n",
			g_bs, s->lbsize);
		s->errors++;
		return NULL;
	}
	s->per_io = g_bs / s->lbsize;
	s->nslots_lun = s->nblocks / s->per_io;
	/* sessions split the LUN for fill and start at spread-out points for seq */
	s->seq_next = s->nslots_lun * s->idx / g_sessions;
	s->seq_end = s->nslots_lun * (s->idx + 1) / g_sessions;
	s->rng = 0x9e3779b97f4a7c15ull ^ ((uint64_t)getpid() << 16) ^ (uint64_t)(s->idx + 1) * 0x2545F4914F6CDD1Dull;
	if (!s->rng)
		s->rng = 1;

	s->slots = calloc(g_qd, sizeof *s->slots);
	s->hist = calloc(HIST_US + 1, sizeof *s->hist);
	s->zero_block = calloc(1, s->lbsize);
	if (!s->slots || !s->hist || !s->zero_block) {
		s->errors++;
		return NULL;
	}
	for (int i = 0; i < g_qd; i++) {
		s->slots[i].s = s;
		if (posix_memalign((void **)&s->slots[i].buf, 4096, g_bs) != 0) {
			s->errors++;
			return NULL;
		}
		memset(s->slots[i].buf, 0xa5, g_bs);
	}

	s->t_start_ns = now_ns();
	s->deadline_ns = s->t_start_ns + (uint64_t)(g_seconds * 1e9);
	for (int i = 0; i < g_qd; i++)
		if (submit(&s->slots[i]) != 0)
			break;
	while (s->inflight > 0) {
		struct pollfd pfd = {.fd = iscsi_get_fd(s->iscsi),
				     .events = iscsi_which_events(s->iscsi)};
		int r = poll(&pfd, 1, 1000);
		if (r < 0 && errno != EINTR) {
			perror("poll");
			s->errors++;
			break;
		}
		if (r > 0 && pfd.revents & (POLLERR | POLLHUP | POLLNVAL) && !(pfd.revents & POLLIN)) {
			fprintf(stderr, "iobench[%d]: connection lost\n", s->idx);
			s->errors++;
			break;
		}
		if (iscsi_service(s->iscsi, pfd.revents) < 0) {
			fprintf(stderr, "iobench[%d]: iscsi_service: %s\n", s->idx,
				iscsi_get_error(s->iscsi));
			s->errors++;
			break;
		}
		if (now_ns() > s->deadline_ns + 30ull * 1000000000ull && g_mode != M_FILL) {
			fprintf(stderr, "iobench[%d]: %d commands still outstanding 30 s after the end\n",
				s->idx, s->inflight);
			s->errors++;
			break;
		}
	}
	s->t_end_ns = now_ns();
	if (!s->errors)
		iscsi_logout_sync(s->iscsi);
	iscsi_destroy_context(s->iscsi);
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: iobench [-m read|write|fill|verify|unmap] [-p rand|seq] [-b BYTES] [-q QD] "
			"[-t SECONDS] [-s SESSIONS] [-n] [-I] URL [URL...]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int c;
	while ((c = getopt(argc, argv, "m:p:b:q:t:s:nI")) != -1) {
		switch (c) {
		case 'm':
			if (!strcmp(optarg, "read"))
				g_mode = M_READ;
			else if (!strcmp(optarg, "write"))
				g_mode = M_WRITE;
			else if (!strcmp(optarg, "fill"))
				g_mode = M_FILL;
			else if (!strcmp(optarg, "verify"))
				g_mode = M_VERIFY;
			else if (!strcmp(optarg, "unmap"))
				g_mode = M_UNMAP;
			else
				usage();
			break;
		case 'p':
			if (!strcmp(optarg, "rand"))
				g_random = 1;
			else if (!strcmp(optarg, "seq"))
				g_random = 0;
			else
				usage();
			break;
		case 'b': g_bs = (uint32_t)strtoul(optarg, NULL, 0); break;
		case 'q': g_qd = atoi(optarg); break;
		case 't': g_seconds = atof(optarg); break;
		case 's': g_sessions = atoi(optarg); break;
		case 'n': g_verify = 0; break;
		case 'I': g_no_immediate = 1; break;
		default: usage();
		}
	}
	if (optind >= argc || g_bs == 0 || g_qd < 1 || g_sessions < 1 || g_seconds <= 0)
		usage();
	g_urls = &argv[optind];
	g_nurls = argc - optind;

	struct session *ss = calloc(g_sessions, sizeof *ss);
	for (int i = 0; i < g_sessions; i++) {
		ss[i].idx = i;
		if (pthread_create(&ss[i].th, NULL, run, &ss[i]) != 0) {
			perror("pthread_create");
			return 1;
		}
	}
	uint64_t ios = 0, bytes = 0, lat_sum = 0, lat_max = 0, errors = 0, t0 = UINT64_MAX, t1 = 0;
	static uint64_t hist[HIST_US + 1];
	for (int i = 0; i < g_sessions; i++) {
		pthread_join(ss[i].th, NULL);
		struct session *s = &ss[i];
		if (g_sessions > 1)
			printf("SESSION idx=%d url=%s ios=%" PRIu64 " errors=%" PRIu64 "\n", i,
			       g_urls[i % g_nurls], s->ios, s->errors);
		ios += s->ios;
		bytes += s->bytes;
		lat_sum += s->lat_sum_ns;
		errors += s->errors;
		if (s->lat_max_ns > lat_max)
			lat_max = s->lat_max_ns;
		if (s->t_start_ns && s->t_start_ns < t0)
			t0 = s->t_start_ns;
		if (s->t_end_ns > t1)
			t1 = s->t_end_ns;
		if (s->hist)
			for (int b = 0; b <= HIST_US; b++)
				hist[b] += s->hist[b];
	}
	double secs = (t1 > t0) ? (t1 - t0) / 1e9 : 0;
	double p50 = 0, p99 = 0;
	uint64_t acc = 0;
	int have50 = 0;
	for (int b = 0; b <= HIST_US && ios; b++) {
		acc += hist[b];
		if (!have50 && acc * 2 >= ios) {
			p50 = b + 0.5;
			have50 = 1;
		}
		if (acc * 100 >= ios * 99) {
			p99 = b + 0.5;
			break;
		}
	}
	printf("RESULT ios=%" PRIu64 " bytes=%" PRIu64 " seconds=%.3f iops=%.0f mbps=%.1f "
	       "lat_mean_us=%.1f lat_p50_us=%.1f lat_p99_us=%.1f lat_max_us=%.1f errors=%" PRIu64 "\n",
	       ios, bytes, secs, secs > 0 ? ios / secs : 0, secs > 0 ? bytes / secs / 1e6 : 0,
	       ios ? lat_sum / 1e3 / ios : 0, p50, p99, lat_max / 1e3, errors);
	return errors || ios == 0 ? 1 : 0;
}

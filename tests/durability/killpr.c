/*
 * killpr: APTPL state across a kill -9.
 *
 * usage: killpr register URL PID K LOG [MAX_DELAY_US]
 *        killpr readkeys URL
 *
 * register: PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY with
 * APTPL=1 in a loop, each with a new key, one at a time. When the K-th is
 * GOOD the next one is queued and pushed onto the wire, then after a random
 * 0..MAX_DELAY_US (default 12000: about one save with its fsync here) the
 * target is SIGKILLed, so the kill lands before, during or after the save of
 * the state file. LOG gets:
 *   acked_key HEX       the last key whose REGISTER was GOOD
 *   inflight_key HEX    the key sent just before the kill (may or may not
 *                       have been applied), or "none"
 * Exit 0: K GOODs and no error status before the kill.
 *
 * readkeys: PERSISTENT RESERVE IN READ KEYS; prints "generation N keys K1 K2 ..."
 * (hex). Exit 1 if the command fails.
 */
#include <signal.h>
#include <sys/types.h>

#include "kwcommon.h"

static struct {
	struct iscsi_context *iscsi;
	int lun;
	pid_t pid;
	uint32_t k, n_good, sent, max_delay_us, delay_us;
	uint64_t key_base, acked_key, inflight_key;
	unsigned char par[24];
	int inflight, kill_pending, killed, errors;
} g;

static uint64_t key_of(uint32_t i)
{
	/* never 0: REGISTER AND IGNORE with key 0 unregisters */
	return g.key_base | (uint64_t)(i + 1);
}

static void cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv);

static void send_register(void)
{
	uint64_t key = key_of(g.sent);
	unsigned char cdb[10] = {0x5f, 0x06, 0, 0, 0, 0, 0, 0, sizeof g.par, 0};
	memset(g.par, 0, sizeof g.par);
	for (int i = 0; i < 8; i++)
		g.par[8 + i] = (unsigned char)(key >> (56 - 8 * i)); /* service action key */
	g.par[20] = 0x01;					    /* APTPL */
	struct scsi_task *t = scsi_create_task(10, cdb, SCSI_XFER_WRITE, sizeof g.par);
	struct iscsi_data d = {.size = sizeof g.par, .data = g.par};
	if (!t || iscsi_scsi_command_async(g.iscsi, g.lun, t, cb, &d, (void *)(uintptr_t)key) != 0) {
		describe(g.iscsi, "queue PERSISTENT RESERVE OUT", NULL);
		g.errors++;
		return;
	}
	g.sent++;
	g.inflight = 1;
	g.inflight_key = key;
}

static void cb(struct iscsi_context *iscsi, int status, void *command_data, void *priv)
{
	struct scsi_task *t = command_data;
	uint64_t key = (uint64_t)(uintptr_t)priv;
	(void)iscsi;
	g.inflight = 0;
	if (status == SCSI_STATUS_GOOD) {
		g.acked_key = key;
		if (key == g.inflight_key)
			g.inflight_key = 0;
		g.n_good++;
	} else if (!g.killed) {
		describe(g.iscsi, "PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY", t);
		g.errors++;
	}
	if (t)
		scsi_free_scsi_task(t);
	if (g.killed || g.errors)
		return;
	send_register();
	if (g.n_good >= g.k)
		g.kill_pending = 1;
}

static void do_kill(void)
{
	/* Push the next REGISTER onto the wire first (not from inside the
	 * callback: iscsi_service is not reentrant), so the target may be in
	 * the middle of saving it when it dies. */
	iscsi_service(g.iscsi, POLLOUT);
	if (g.delay_us)
		usleep(g.delay_us);
	if (kill(g.pid, SIGKILL) != 0) {
		perror("killpr: kill");
		g.errors++;
	}
	g.kill_pending = 0;
	g.killed = 1;
}

static int do_register(const char *url, const char *logpath)
{
	char who[64];
	snprintf(who, sizeof who, "killpr-%d", (int)getpid());
	g.iscsi = login(url, who, &g.lun);
	uint64_t rnd = random_nonce();
	g.key_base = rnd & 0xffffffff00000000ull;
	g.delay_us = g.max_delay_us ? (uint32_t)(rnd % (g.max_delay_us + 1)) : 0;
	if (!g.key_base)
		g.key_base = 1ull << 32;
	send_register();
	uint64_t deadline = now_ns() + 60000000000ull, kill_deadline = 0;
	while (!g.errors && g.inflight) {
		uint64_t now = now_ns();
		if (g.killed && !kill_deadline)
			kill_deadline = now + 5000000000ull;
		if ((!g.killed && now > deadline) || (g.killed && now > kill_deadline)) {
			if (!g.killed) {
				fprintf(stderr, "killpr: %u GOODs of %u after 60 s\n", g.n_good, g.k);
				g.errors++;
			}
			break;
		}
		struct pollfd pfd = {.fd = iscsi_get_fd(g.iscsi), .events = iscsi_which_events(g.iscsi)};
		int r = poll(&pfd, 1, 200);
		if (r < 0 && errno != EINTR) {
			perror("killpr: poll");
			g.errors++;
			break;
		}
		if (r > 0 && iscsi_service(g.iscsi, pfd.revents) < 0) {
			if (!g.killed) {
				fprintf(stderr, "killpr: connection lost: %s\n", iscsi_get_error(g.iscsi));
				g.errors++;
			}
			break;
		}
		if (g.kill_pending)
			do_kill();
	}
	if (!g.killed)
		kill(g.pid, SIGKILL); /* a failed run must not leave the target running */
	FILE *f = fopen(logpath, "w");
	if (!f)
		die("cannot create %s", logpath);
	fprintf(f, "k %u\ndelay_us %u\ngood %u\nsent %u\nacked_key %016" PRIx64 "\n", g.k,
		g.delay_us, g.n_good, g.sent, g.acked_key);
	if (g.inflight_key)
		fprintf(f, "inflight_key %016" PRIx64 "\n", g.inflight_key);
	else
		fprintf(f, "inflight_key none\n");
	fprintf(f, "errors %d\n", g.errors);
	if (fclose(f) != 0)
		die("writing %s failed", logpath);
	return g.errors ? 1 : 0;
}

static int do_readkeys(const char *url)
{
	char who[64];
	int lun;
	snprintf(who, sizeof who, "killpr-read-%d", (int)getpid());
	struct iscsi_context *iscsi = login(url, who, &lun);
	unsigned char cdb[10] = {0x5e, 0x00, 0, 0, 0, 0, 0, 0x10, 0x00, 0}; /* READ KEYS, 4 KiB */
	struct scsi_task *t = cmd_sync(iscsi, lun, "PERSISTENT RESERVE IN READ KEYS", cdb, 10,
				       SCSI_XFER_READ, 4096, NULL, 0);
	if (!t)
		return 1;
	const unsigned char *d = t->datain.data;
	int n = t->datain.size;
	if (n < 8) {
		fprintf(stderr, "killpr: READ KEYS returned %d bytes\n", n);
		return 1;
	}
	uint32_t gen = (uint32_t)d[0] << 24 | d[1] << 16 | d[2] << 8 | d[3];
	uint32_t len = (uint32_t)d[4] << 24 | d[5] << 16 | d[6] << 8 | d[7];
	if (len % 8 || 8 + len > (uint32_t)n) {
		fprintf(stderr, "killpr: READ KEYS: additional length %u in %d bytes\n", len, n);
		return 1;
	}
	printf("generation %u keys", gen);
	for (uint32_t off = 8; off < 8 + len; off += 8) {
		uint64_t key = 0;
		for (int i = 0; i < 8; i++)
			key = key << 8 | d[off + i];
		printf(" %016" PRIx64, key);
	}
	printf("\n");
	scsi_free_scsi_task(t);
	iscsi_logout_sync(iscsi);
	iscsi_destroy_context(iscsi);
	return 0;
}

int main(int argc, char **argv)
{
	g_prog = "killpr";
	if ((argc == 6 || argc == 7) && strcmp(argv[1], "register") == 0) {
		g.max_delay_us = argc == 7 ? (uint32_t)atoi(argv[6]) : 12000;
		g.pid = (pid_t)atoi(argv[3]);
		g.k = (uint32_t)atoi(argv[4]);
		if (g.pid <= 1 || g.k < 1)
			die("bad PID or K");
		return do_register(argv[2], argv[5]);
	}
	if (argc == 3 && strcmp(argv[1], "readkeys") == 0)
		return do_readkeys(argv[2]);
	fprintf(stderr, "usage: killpr register URL PID K LOG [MAX_DELAY_US]\n       killpr readkeys URL\n");
	return 2;
}

/*
 * LD_PRELOAD shim for libiscsi clients (iscsi-test-cu, iscsi-inq): force the
 * initiator to offer HeaderDigest=CRC32C only.
 *
 * Why: libiscsi 1.19 parses `?header_digest=crc32c` in the URL, but its tools
 * then call iscsi_set_header_digest(ISCSI_HEADER_DIGEST_NONE_CRC32C) themselves,
 * so the login offers "HeaderDigest=None,CRC32C" and an RFC 7143 target picks
 * None: the "digest" conformance variant would silently run without digests.
 * With FORCE_HEADER_DIGEST=crc32c in the environment this wrapper replaces every
 * value by ISCSI_HEADER_DIGEST_CRC32C (3 in enum iscsi_header_digest:
 * NONE=0, NONE_CRC32C=1, CRC32C_NONE=2, CRC32C=3).
 *
 * Built by scripts/test.sh:  cc -shared -fPIC -o force_digest.so force_digest.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

struct iscsi_context;

int iscsi_set_header_digest(struct iscsi_context *iscsi, int header_digest)
{
	static int (*real)(struct iscsi_context *, int);
	const char *force = getenv("FORCE_HEADER_DIGEST");

	if (!real)
		real = (int (*)(struct iscsi_context *, int))
			dlsym(RTLD_NEXT, "iscsi_set_header_digest");
	if (!real)
		return -1;
	if (force && strcmp(force, "crc32c") == 0)
		header_digest = 3;
	return real(iscsi, header_digest);
}

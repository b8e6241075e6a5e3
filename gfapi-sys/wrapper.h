/* glfs.h defines _FILE_OFFSET_BITS and _GNU_SOURCE itself before its
 * system includes, so off_t is 64 bits in every binding. */
#include <glusterfs/api/glfs.h>

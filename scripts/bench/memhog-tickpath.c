/* memhog.c with its tick file moved to $MEMHOG_TICK when that is set (else /tick, as memhog.c):
 * the DMTCP floor runs it on the host, where /tick would be the host's. Built dynamically
 * linked (DMTCP cannot wrap a static program), it is also the program of the DMTCP image, so
 * that the floor and the shim run the same binary.
 *
 * stdio.h is included first, so memhog.c's own include is a no-op and the macro below only
 * renames its one call, fopen("/tick", "w"). */
#include <stdio.h>
#include <stdlib.h>

static FILE *tick_fopen(const char *path, const char *mode) {
    const char *moved = getenv("MEMHOG_TICK");
    return fopen(moved && *moved ? moved : path, mode);
}
#define fopen(path, mode) tick_fopen(path, mode)
#include "memhog.c"

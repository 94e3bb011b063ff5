/* Touches N MiB of incompressible memory, then ticks a counter every 100 ms: the workload of
 * the checkpoint benchmarks. Static, so it runs in an image of its own with nothing else. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 16;
    size_t n = mib << 20;
    uint64_t *p = malloc(n);
    if (!p) { perror("malloc"); return 1; }
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < n / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[i] = x; }
    printf("ready %zu MiB\n", mib);
    fflush(stdout);
    for (unsigned long tick = 0;; tick++) {
        FILE *f = fopen("/tick", "w");
        if (f) { fprintf(f, "%lu %lu\n", tick, (unsigned long)p[tick % (n / 8)]); fclose(f); }
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
}

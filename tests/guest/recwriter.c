/*
 * recwriter: a guest program for the Level 3 disk tests (issue 11). It writes numbered
 * records to a ring of disk blocks and keeps the number of the last record whose write
 * completed in a page of its memory that the host can find in a RAM file, so that the
 * host can compare a disk image with what the guest's memory says it wrote.
 *
 *   recwriter DEVICE FIRST_BLOCK BLOCKS MAGIC PAUSE_US
 *
 * Record n (from 1) goes to 4 KiB block FIRST_BLOCK + n % BLOCKS with O_DIRECT and
 * O_DSYNC: "FTVMREC1", n, MAGIC (little-endian 64-bit words), then n in every other word.
 * Once its write returned, n is stored in the state page: the words MAGIC, MAGIC rotated
 * left by 17, n, at the start of a page-aligned page (MAGIC is given in hex on the command
 * line, so its binary form is in no file). Prints "REC n" every 16 records; on an error
 * prints "REC-FAILED n ..." and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 4096UL
#define WORDS (BLOCK / sizeof(uint64_t))

static volatile uint64_t state[WORDS] __attribute__((aligned(4096)));

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: recwriter DEVICE FIRST_BLOCK BLOCKS MAGIC PAUSE_US\n");
		return 2;
	}
	uint64_t first = strtoull(argv[2], NULL, 0);
	uint64_t blocks = strtoull(argv[3], NULL, 0);
	uint64_t magic = strtoull(argv[4], NULL, 16);
	useconds_t pause = (useconds_t)strtoul(argv[5], NULL, 0);
	int fd = open(argv[1], O_WRONLY | O_DIRECT | O_DSYNC);
	if (fd < 0 || blocks == 0) {
		printf("REC-FAILED 0 open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	uint64_t *buffer;
	if (posix_memalign((void **)&buffer, BLOCK, BLOCK) != 0)
		return 1;
	state[0] = magic;
	state[1] = (magic << 17) | (magic >> 47);
	state[2] = 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (uint64_t n = 1;; n++) {
		memcpy(buffer, "FTVMREC1", 8);
		buffer[1] = n;
		buffer[2] = magic;
		for (size_t word = 3; word < WORDS; word++)
			buffer[word] = n;
		off_t offset = (off_t)((first + n % blocks) * BLOCK);
		ssize_t written = pwrite(fd, buffer, BLOCK, offset);
		if (written != (ssize_t)BLOCK) {
			printf("REC-FAILED %llu %zd %s\n", (unsigned long long)n, written,
			       strerror(errno));
			return 1;
		}
		state[2] = n;
		if (n % 16 == 0)
			printf("REC %llu\n", (unsigned long long)n);
		if (pause)
			usleep(pause);
	}
}

/*
 * memcheck: a guest program for the Level 3 tests (issue 11). It keeps MB MiB of its own
 * memory in a known state and checks it all the time, so that a guest restored from a
 * checkpoint that missed a page finds out.
 *
 *   memcheck MB [DISK]
 *
 * Memory: every pass rewrites every word of every page with a value of (page, word, pass),
 * after checking that the page still holds the previous pass's values. A stale page
 * (a write the checkpoint did not carry) is found within one pass.
 *
 * Disk (optional): every pass first checks that the 1 MiB read buffer still holds what the
 * previous pass read into it, then writes a new version of a 1 MiB disk region (one per
 * pass: its values name the pass) and reads it back into the read buffer with O_DIRECT
 * (the disk daemon writes the read buffer's pages, not the guest's CPU). A read buffer
 * page the checkpoint did not carry holds an older pass's values and is found at the next
 * pass.
 *
 * Prints "MEMCHECK-READY", then "MEM-PASS n" after each pass; on a mismatch prints
 * "MEM-STALE ..." or "DISK-STALE ..." and exits 1.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define DISK_BLOCKS 256UL

static uint64_t value(uint64_t page, uint64_t word, uint64_t pass)
{
	return (pass << 40) ^ (page << 12) ^ word ^ 0x5a5a000000000000ULL;
}

static uint64_t disk_value(uint64_t version, uint64_t block, uint64_t word)
{
	return 0xd15c000000000000ULL ^ (version << 32) ^ (block << 12) ^ word;
}

static void *map(size_t bytes)
{
	void *memory = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (memory == MAP_FAILED) {
		perror("memcheck: mmap");
		exit(2);
	}
	return memory;
}

/* Writes version `version` of the region from `write_buffer`, then reads it back into
 * `read_buffer` (both O_DIRECT). */
static void cycle_disk(int fd, uint64_t *write_buffer, uint64_t *read_buffer, uint64_t version)
{
	for (uint64_t block = 0; block < DISK_BLOCKS; block++)
		for (uint64_t word = 0; word < WORDS; word++)
			write_buffer[block * WORDS + word] = disk_value(version, block, word);
	if (pwrite(fd, write_buffer, DISK_BLOCKS * PAGE, 0) != (ssize_t)(DISK_BLOCKS * PAGE) ||
	    fdatasync(fd) != 0) {
		perror("memcheck: write the disk region");
		exit(2);
	}
	if (pread(fd, read_buffer, DISK_BLOCKS * PAGE, 0) != (ssize_t)(DISK_BLOCKS * PAGE)) {
		perror("memcheck: read the disk region");
		exit(2);
	}
}

static void check_disk_buffer(const uint64_t *buffer, uint64_t version, uint64_t pass)
{
	for (uint64_t block = 0; block < DISK_BLOCKS; block++)
		for (uint64_t word = 0; word < WORDS; word++) {
			uint64_t found = buffer[block * WORDS + word];
			uint64_t want = disk_value(version, block, word);
			if (found != want) {
				printf("DISK-STALE pass=%llu block=%llu word=%llu want=%llx found=%llx\n",
				       (unsigned long long)pass, (unsigned long long)block,
				       (unsigned long long)word, (unsigned long long)want,
				       (unsigned long long)found);
				exit(1);
			}
		}
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: memcheck MB [DISK]\n");
		return 2;
	}
	uint64_t pages = strtoull(argv[1], NULL, 10) * 1024 * 1024 / PAGE;
	uint64_t *memory = map(pages * PAGE);
	uint64_t *buffer = NULL, *write_buffer = NULL;
	int disk = -1;
	if (argc > 2) {
		disk = open(argv[2], O_RDWR | O_DIRECT);
		if (disk < 0) {
			perror("memcheck: open the disk");
			return 2;
		}
		buffer = map(DISK_BLOCKS * PAGE);
		write_buffer = map(DISK_BLOCKS * PAGE);
		cycle_disk(disk, write_buffer, buffer, 0);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("MEMCHECK-READY pages=%llu\n", (unsigned long long)pages);
	for (uint64_t pass = 1;; pass++) {
		if (disk >= 0) {
			/* The buffer holds the version the previous pass read (0 before pass 1). */
			check_disk_buffer(buffer, pass - 1, pass);
			cycle_disk(disk, write_buffer, buffer, pass);
		}
		for (uint64_t page = 0; page < pages; page++) {
			uint64_t *words = memory + page * WORDS;
			for (uint64_t word = 0; word < WORDS; word++) {
				uint64_t want = pass == 1 ? 0 : value(page, word, pass - 1);
				if (words[word] != want) {
					printf("MEM-STALE pass=%llu page=%llu word=%llu want=%llx found=%llx\n",
					       (unsigned long long)pass, (unsigned long long)page,
					       (unsigned long long)word, (unsigned long long)want,
					       (unsigned long long)words[word]);
					return 1;
				}
				words[word] = value(page, word, pass);
			}
		}
		printf("MEM-PASS %llu\n", (unsigned long long)pass);
	}
}

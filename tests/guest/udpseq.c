/*
 * udpseq: a guest program for the Level 3 output commit tests (issue 11). It sends
 * numbered UDP datagrams to a LAN peer and keeps the number of the last one sent in a page
 * of its memory that the host can find in a RAM file.
 *
 *   udpseq ADDRESS PORT MAGIC PAUSE_US
 *
 * Datagram n (from 1) is "SEQ n T" with T the guest's CLOCK_MONOTONIC in nanoseconds when
 * it was made: a datagram sent again after a restore carries the same n and another T.
 * Once sendto returned, n is stored in the state page: the words MAGIC, MAGIC rotated left
 * by 17, n, at the start of a page-aligned page (MAGIC is given in hex on the command line).
 * Prints "UDP-SENT n" every 10 datagrams; a failed send is retried with the same bytes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t state[512] __attribute__((aligned(4096)));

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: udpseq ADDRESS PORT MAGIC PAUSE_US\n");
		return 2;
	}
	struct sockaddr_in peer = { .sin_family = AF_INET };
	peer.sin_port = htons((uint16_t)atoi(argv[2]));
	if (inet_pton(AF_INET, argv[1], &peer.sin_addr) != 1) {
		fprintf(stderr, "udpseq: bad address %s\n", argv[1]);
		return 2;
	}
	uint64_t magic = strtoull(argv[3], NULL, 16);
	useconds_t pause = (useconds_t)strtoul(argv[4], NULL, 0);
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		printf("UDP-FAILED socket: %s\n", strerror(errno));
		return 1;
	}
	state[0] = magic;
	state[1] = (magic << 17) | (magic >> 47);
	state[2] = 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (uint64_t n = 1;; n++) {
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		char datagram[64];
		int len = snprintf(datagram, sizeof(datagram), "SEQ %llu %lld",
				   (unsigned long long)n,
				   (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
		while (sendto(fd, datagram, (size_t)len, 0, (struct sockaddr *)&peer,
			      sizeof(peer)) != len) {
			printf("UDP-RETRY %llu %s\n", (unsigned long long)n, strerror(errno));
			usleep(pause ? pause : 1000);
		}
		state[2] = n;
		if (n % 10 == 0)
			printf("UDP-SENT %llu\n", (unsigned long long)n);
		if (pause)
			usleep(pause);
	}
}

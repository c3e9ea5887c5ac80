/*
 * memwrite: the guest side of the Level 3 benchmark (issue 11, ci/bench-checkpoint.sh). A
 * small server on a TCP port that runs one command at a time, plus a ticker, so that the
 * benchmark can drive phases in the guest and see when the guest runs again after a
 * failover.
 *
 *   memwrite PORT BUFFER_MB [TICK_MS]
 *
 * Allocates BUFFER_MB MiB, prints "MEMWRITE-READY", then prints "TICK n" every TICK_MS ms
 * (default 50; its own thread) and serves connections on PORT, one line per command:
 *
 *   write ID RATE_MB SECONDS  rewrites whole pages of the buffer, in order and round and
 *                             round, at RATE_MB MB/s (10^6 bytes) for SECONDS seconds of
 *                             the guest's clock, paced every millisecond. Every word of a
 *                             page gets a new value of (page, word, pass): the page differs
 *                             from its previous version in every word.
 *   cpu ID LOOPS              a fixed busy loop of LOOPS iterations, timed by the guest.
 *
 * Each command prints "BEGIN ID" before and "END ID <figures>" after on the console and
 * answers its line on the socket with the END line. A write ends with "END ID mb_s pages";
 * a cpu loop with "END ID guest_ms".
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))

static uint64_t *buffer;
static uint64_t buffer_pages;
static uint64_t next_page;
static uint64_t pass;
static long tick_ms = 50;

static double now_seconds(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* One line to the console in one write (the ticker thread prints too). */
static void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *format, ...)
{
	char line[256];
	va_list arguments;
	va_start(arguments, format);
	int length = vsnprintf(line, sizeof line - 1, format, arguments);
	va_end(arguments);
	if (length < 0)
		return;
	if ((size_t)length > sizeof line - 2)
		length = sizeof line - 2;
	line[length++] = '\n';
	if (write(STDOUT_FILENO, line, (size_t)length) < 0)
		return;
}

static void *ticker(void *unused)
{
	(void)unused;
	struct timespec interval = {.tv_sec = tick_ms / 1000, .tv_nsec = (tick_ms % 1000) * 1000 * 1000};
	for (uint64_t tick = 1;; tick++) {
		say("TICK %llu", (unsigned long long)tick);
		nanosleep(&interval, NULL);
	}
	return NULL;
}

static void write_page(void)
{
	uint64_t *words = buffer + next_page * WORDS;
	uint64_t stamp = (pass << 40) ^ (next_page << 12);
	for (uint64_t word = 0; word < WORDS; word++)
		words[word] = stamp ^ word;
	next_page++;
	if (next_page == buffer_pages) {
		next_page = 0;
		pass++;
	}
}

/* Rewrites pages at `rate_mb` MB/s for `seconds`; returns the rate reached. */
static double write_at(double rate_mb, double seconds, uint64_t *pages)
{
	struct timespec tick = {.tv_sec = 0, .tv_nsec = 1000 * 1000};
	double start = now_seconds(), elapsed = 0;
	uint64_t written = 0;
	while ((elapsed = now_seconds() - start) < seconds) {
		double due = rate_mb * 1e6 * elapsed / (double)PAGE;
		while ((double)written < due) {
			write_page();
			written++;
		}
		nanosleep(&tick, NULL);
	}
	*pages = written;
	return (double)written * (double)PAGE / 1e6 / elapsed;
}

static double busy_loop(uint64_t loops)
{
	double start = now_seconds();
	volatile uint64_t sink;
	uint64_t state = 88172645463325252ULL;
	for (uint64_t i = 0; i < loops; i++) {
		state ^= state << 13;
		state ^= state >> 7;
		state ^= state << 17;
	}
	sink = state;
	(void)sink;
	return (now_seconds() - start) * 1000.0;
}

/* Runs one command line; writes the END line into `answer`. */
static void run(const char *line, char *answer, size_t size)
{
	char id[32];
	double rate_mb, seconds;
	unsigned long long loops;
	if (sscanf(line, "write %31s %lf %lf", id, &rate_mb, &seconds) == 3) {
		uint64_t pages = 0;
		say("BEGIN %s", id);
		double reached = write_at(rate_mb, seconds, &pages);
		snprintf(answer, size, "END %s %.1f %llu", id, reached, (unsigned long long)pages);
	} else if (sscanf(line, "cpu %31s %llu", id, &loops) == 2) {
		say("BEGIN %s", id);
		double guest_ms = busy_loop(loops);
		snprintf(answer, size, "END %s %.1f", id, guest_ms);
	} else {
		snprintf(answer, size, "ERROR unknown command");
	}
	say("%s", answer);
}

static void serve(int connection)
{
	char line[256];
	size_t length = 0;
	for (;;) {
		ssize_t got = read(connection, line + length, sizeof line - 1 - length);
		if (got <= 0)
			return;
		length += (size_t)got;
		line[length] = 0;
		char *end;
		while ((end = strchr(line, '\n')) != NULL) {
			char answer[256];
			*end = 0;
			run(line, answer, sizeof answer - 1);
			strcat(answer, "\n");
			if (write(connection, answer, strlen(answer)) < 0)
				return;
			length -= (size_t)(end + 1 - line);
			memmove(line, end + 1, length + 1);
		}
		if (length == sizeof line - 1)
			return;
	}
}

int main(int argc, char **argv)
{
	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: memwrite PORT BUFFER_MB [TICK_MS]\n");
		return 2;
	}
	int port = atoi(argv[1]);
	buffer_pages = strtoull(argv[2], NULL, 10) * (1UL << 20) / PAGE;
	if (argc == 4)
		tick_ms = atol(argv[3]);
	if (port <= 0 || buffer_pages == 0 || tick_ms <= 0) {
		fprintf(stderr, "memwrite: bad arguments\n");
		return 2;
	}
	buffer = mmap(NULL, buffer_pages * PAGE, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buffer == MAP_FAILED) {
		perror("memwrite: mmap");
		return 2;
	}
	for (uint64_t page = 0; page < buffer_pages; page++)
		write_page();
	int listener = socket(AF_INET, SOCK_STREAM, 0);
	int yes = 1;
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
	struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) < 0 ||
	    listen(listener, 4) < 0) {
		perror("memwrite: listen");
		return 2;
	}
	pthread_t thread;
	if (pthread_create(&thread, NULL, ticker, NULL) != 0) {
		fprintf(stderr, "memwrite: cannot start the ticker\n");
		return 2;
	}
	say("MEMWRITE-READY");
	for (;;) {
		int connection = accept(listener, NULL, NULL);
		if (connection < 0)
			continue;
		serve(connection);
		close(connection);
	}
}

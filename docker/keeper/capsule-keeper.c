/*
 * capsule-keeper: keeps a session's shell alive between `docker exec`
 * connections, and keeps what it prints while nobody is attached, addressed
 * by exact byte offsets, so that a client coming back gets exactly the bytes
 * it missed.
 *
 *   capsule-keeper [-r | -d] [-t PORT] [-b BYTES] [-o OFFSET] SOCKET -- COMMAND [ARG...]
 *
 * If a keeper server listens on the UNIX socket SOCKET, this attaches to it;
 * otherwise it starts one (under the lock SOCKET.lock, so that only one
 * starts) and then attaches.  The server is double-forked into its own
 * session with its stdio on /dev/null, and runs COMMAND (with this first
 * invocation's environment and directory) on a new pty.  Every byte COMMAND
 * prints has an offset (0, 1, 2, ...); the server keeps the newest BYTES
 * (default 1 MiB) of them in a ring buffer.
 *
 * The attach puts its terminal in raw mode and relays stdin to COMMAND and
 * COMMAND's output to stdout.  The first bytes it writes are a preamble,
 *
 *   ESC _ capsule-keeper;offset=S;dropped=D ESC \
 *
 * where S = min(max(OFFSET, first offset held), end) is the offset of the
 * byte that follows and D = S - OFFSET the bytes lost if OFFSET was no longer
 * held (else 0).  Terminal size changes (SIGWINCH) are passed on to the pty.
 *
 * The server has one attachment at a time: a new attach replaces the old one.
 * Nobody attached, it reads the pty into the ring regardless (the oldest bytes
 * go); attached, it never overwrites bytes not yet sent and stops reading the
 * pty while 256 KiB are unsent, so a slow client slows COMMAND down instead of
 * losing output.  When COMMAND has ended and its output is all sent, the
 * attachment gets COMMAND's status.
 *
 * Output is sent as soon as it is read, unless it is a flood (more than
 * FLOOD_BYTES in about WINDOW_US): then it is gathered into frames of up to
 * MAXMSG bytes, none held longer than HOLD_US, so that each process after the
 * keeper (the relay, Docker, capsule, the browser) handles a flood in a few
 * large pieces rather than a pty read's worth at a time.  A keystroke's echo
 * is never held.
 *
 * Both directions are framed: 1-byte type, 4-byte big-endian length, payload.
 *   attach -> server:  'a' OFFSET(8) COLS(2) ROWS(2): first, once
 *                      'i' bytes for COMMAND      'w' COLS(2) ROWS(2)
 *   server -> attach:  'o' output bytes (the preamble is the first)
 *                      'x' STATUS(4): COMMAND ended, everything was sent
 *                      'k': another attach replaced this one
 *                      'P' MORE(2) PORT(2)...: the TCP ports listening in
 *                          the container (see "Ports" below)
 *
 * The server fails closed: an attachment that sends anything but 'a' first,
 * or then anything but 'i' of at most MAXMSG bytes and 'w' of exactly 4, is
 * disconnected at that frame's header (nothing of it or after it is used,
 * and nothing waits for a length it announced).  COMMAND lives on.
 *
 * With -r (relay), the attach does not touch its terminal: it sends 'a' with
 * OFFSET and a 0x0 size, then copies its stdin to the server and the server's
 * frames to its stdout, both verbatim, so that its caller speaks the framing
 * itself (input 'i', size 'w'; output 'o', status 'x', 'k').  capsule runs it
 * in an exec without a TTY: one pty (the server's) instead of two, and none of
 * Docker's detach-key handling, which only applies to TTY streams.  The relay
 * passes on whole frames only, and checks each header as it comes: at a frame
 * of any other kind or size it passes on the frames before it, says which it
 * refused on stderr and exits 255, as it does when its stdin ends inside a
 * frame (that frame is dropped).  A relay exits 253 when its stdin ends (after
 * passing on the frames it has, waiting for the server at most a second), 0
 * when the server closes, 255 on errors.
 *
 * Channels: TCP connections carried over the attachment's stream, asked for
 * by the environment variable CAPSULE_KEEPER_CHANNELS (a relay then sends
 * 'a' with a 13th byte, 1, and the preamble says ";channels=N" after
 * dropped=D, N the most channels open at once; the variable is the keeper's,
 * never COMMAND's).  Its value, if not 0, is a port: a server it starts also
 * listens on 127.0.0.1:PORT (the door), and each connection there becomes a
 * channel of the keeper's.  Every channel frame starts with the channel's
 * 4-byte id (the keeper's are 1 .. 2^31-1, capsule's have the top bit set):
 *   capsule -> keeper: 'C' ID PORT(2): connect to 127.0.0.1:PORT (answered
 *                      with 'A' ID once connected, or 'F')
 *   keeper -> capsule: 'C' ID PORT(2): a connection came in on the door
 *   both ways:         'D' ID bytes (at most CHUNK); 'E' ID: no more bytes
 *                      from this side (the socket's half-close); 'F' ID
 *                      REASON: the channel is gone (an error, a refusal; no
 *                      answer); 'G' ID N(4): N more bytes may be sent
 * A side may have at most CWINDOW bytes sent and not granted back on each
 * channel: the keeper grants what it wrote to the socket, and reads a socket
 * only while it may send (so a slow reader on either side stops the other,
 * and neither holds more than a window).  The shell's output and channel
 * data take turns on the stream (control frames first), so a bulk channel
 * delays a keystroke's echo by one CHUNK at most.  At most CHANNELS are open
 * at once: past that, capsule's 'C' is answered with 'F', and a connection on
 * the door is closed and counted, capsule being told with an 'F' of channel
 * 0.  Channels end with their attachment (a new one starts with none).
 *
 * With -t PORT, a server this invocation starts also listens on TCP PORT
 * (all of the container's addresses), so that capsule can reach it without a
 * relay exec (no dockerd, no containerd-shim on the way).  A TCP attachment
 * must first prove it is capsule's: its first frame is 's' with the session's
 * 32-byte secret, which this invocation reads as the same 's' frame from its
 * stdin before anything else (never from its arguments or environment, which
 * the session's processes can read).  A TCP connection is nobody's until its
 * secret matches (a wrong one, another first frame, or none within PENDING_MS
 * closes it, and the attachment in place is not disturbed); then it is an
 * attachment as any other ('a' first, ...), replacing the one in place.  At
 * most PENDING connections wait at once (more are closed at once).  With -t
 * the keeper makes itself non-dumpable, so that the session's processes,
 * which run as the same user, cannot read the secret from its memory.
 *
 * With -d (start), the invocation only makes sure a server runs (starting it
 * as above), then exits 0 without attaching: capsule then attaches over TCP.
 *
 * Ports: while an attachment is in place, the server asks the kernel for the
 * container's listening TCP sockets (sock_diag over netlink, else
 * /proc/net/tcp and /proc/net/tcp6: the container has its own network
 * namespace, so every socket in them is the session's) every PORTS_MS
 * (PORTS_IDLE_MS while COMMAND has printed nothing for PORTS_QUIET_MS), and sends the attachment a 'P' frame whenever the set of ports
 * in the LISTEN state changed, and once after each attachment's preamble:
 * the ports, ascending, 2 bytes each, at most MAX_PORTS of them (the lowest),
 * after a 2-byte count of those left out.  Its own TCP port (-t) and Docker's
 * embedded DNS server (127.0.0.11) are not among them.  Nobody attached, it
 * reads nothing.
 *
 * The screen across a stop: a server started with the environment variable
 * CAPSULE_KEEPER_SCREEN=PATH (an absolute path; the variable is the
 * keeper's, never COMMAND's, and a keeper before this one ignores it) keeps
 * its ring in the file PATH, so that a session whose container is stopped
 * and started again shows what it had on its screen.
 *   - Saving: while COMMAND has printed since the last save, what the ring
 *     holds is saved to PATH, at most once every SAVE_MS, and at once on
 *     SIGHUP, on SIGTERM (then the server ends as before) and when the
 *     server ends.  The file is
 *       ESC _ capsule-screen;start=S ESC \  then bytes, the newest last
 *     S being the offset of the first byte after the header.  A save adds
 *     the output since the last one to the file the keeper left, while it is
 *     that file (same inode and size) and holds at most twice BYTES; else
 *     (the first save, a file replaced or written to by anyone else, more
 *     output than the ring holds since the last save) the ring is written
 *     to a new file beside PATH, renamed over it.  So a session that prints
 *     costs the disk about what it prints.  PATH's directory is made (0700)
 *     if missing, the file is 0600; where PATH is anything but a regular
 *     file, a symbolic link included, nothing is saved (the keeper replaces
 *     only its own kind of file).  No output, no save and no wakeup.
 *     capsule writes the same format when it saves a session's screen
 *     itself (capsule/core/keeper.py).
 *   - Loading: a server that starts finds PATH (a regular file; opened
 *     without following a symbolic link, never blocking; anything else, or
 *     an empty file, is as no file) and loads its last BYTES bytes into the
 *     ring as the first output, at the offsets they had (without a valid
 *     header, from 0), then a marker on a line of its own:
 *       CAN, normal screen buffer, soft reset, mouse and bracketed paste off,
 *       CR LF, dim "── resumed YYYY-MM-DD HH:MM UTC: the screen above is from
 *       before the session was put away ──", attributes reset, CR LF
 *     and COMMAND's output follows at the next offsets.  Offsets thus go on
 *     from where the saved screen ended: a client (capsule) that had the
 *     output up to OFFSET before the stop asks for OFFSET and gets exactly
 *     the bytes it lacked, the marker and the new output; one that asks for
 *     less than the first byte loaded gets it all (the preamble's dropped
 *     says how much came before it).  Every byte of the file is the
 *     session's (its processes can write it): at most SCREEN_HEAD bytes of
 *     header and BYTES more are read whatever its size, S and the bytes
 *     after the header are each at most SCREEN_MAX_END (else the header is
 *     not believed), and what was loaded goes to the client as output,
 *     never interpreted by the keeper.
 *
 * Bad or missing arguments: the usage on stderr, exit status 2 (-h: on
 * stdout, 0).  BYTES is 1 to 2^32, OFFSET 0 to 2^64-1, both plain decimal.
 *
 * Exit status of an attach: COMMAND's (128+N if killed by signal N) after
 * all its output was written; 253 when its own terminal went away (stdin at
 * EOF or hung up, stdout failing, SIGHUP; the server and COMMAND live on);
 * 254 when replaced by another attach; 255 with a message on stderr when the
 * server is gone or unreachable.
 *
 * Docker does not tell a TTY exec that its client went away (no EOF, no
 * SIGHUP; the output is drained and dropped), so an attach whose connection
 * was lost stays attached until the next attach replaces it.  If COMMAND ends
 * meanwhile, that stale attach gets the status: so an ended session keeps
 * answering attaches (the missing output, then the status) until nobody has
 * been attached for LINGER_MS, and only then removes SOCKET and exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/prctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAXMSG 65536        /* largest frame payload */
#define HIGH_WATER 262144   /* unsent bytes at which the pty is no longer read */
#define MAX_INPUT (1 << 20) /* input waiting for the pty */
#define QUIET_MS 250        /* COMMAND gone, pty still open: output ends after this quiet */
#define DRAIN_MAX_MS 3000   /* ... or this long after COMMAND ended */
#define LEAVE_MS 5000       /* time a replaced attach has to take its last bytes */
#define DETACHED 253        /* exit status of an attach whose terminal went away */
#define FLOOD_BYTES 16384   /* more output than this within WINDOW_US is a flood, */
#define WINDOW_US 10000
#define HOLD_US 2000        /* ... which is sent in frames of MAXMSG or after this wait */
#define SECRET 32          /* bytes of a TCP attachment's secret */
#define PENDING 4          /* TCP connections waiting to prove it at once */
#define PENDING_MS 5000    /* ... each for at most this long */
#define PORTS_MS 1000      /* the socket table is read this often (attached), */
#define PORTS_IDLE_MS 10000  /* ... or this often once COMMAND printed nothing */
#define PORTS_QUIET_MS 30000 /* ... for this long */
#define MAX_PORTS 64       /* ports a 'P' frame names at most */
#ifndef LINGER_MS
#define LINGER_MS 600000    /* an ended session waits this long for an attach */
#endif
#ifndef SAVE_MS
#define SAVE_MS 2000        /* the screen is saved at most this often (see the top) */
#endif
#define SCREEN_ENV "CAPSULE_KEEPER_SCREEN"
#define SCREEN_HEAD 64      /* the most a screen file's header may be */
#define SCREEN_MAX_END (1ULL << 52)  /* the largest offset a screen file may give */

typedef unsigned long long u64;

static int sigfd[2] = {-1, -1}; /* self-pipe: handlers write the signal number */

static void on_signal(int sig)
{
    int e = errno;
    char c = (char)sig;
    (void)!write(sigfd[1], &c, 1);
    errno = e;
}

static void catch(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

static void setfl(int fd, int cloexec, int nonblock)
{
    if (cloexec) fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (nonblock) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int make_sigpipe(void)
{
    if (pipe(sigfd) < 0) return -1;
    for (int i = 0; i < 2; i++) setfl(sigfd[i], 1, 1);
    return 0;
}

static long long now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

static u64 get_be(const unsigned char *p, int n)
{
    u64 v = 0;
    while (n--) v = v << 8 | *p++;
    return v;
}

static void put_be(unsigned char *p, u64 v, int n)
{
    while (n--) { p[n] = (unsigned char)v; v >>= 8; }
}

/* Writes a frame at p; returns its size. */
static size_t frame(unsigned char *p, char type, const void *data, size_t len)
{
    p[0] = (unsigned char)type;
    put_be(p + 1, len, 4);
    if (len) memcpy(p + 5, data, len);
    return 5 + len;
}

/* ---- server -------------------------------------------------------------- */

struct conn {
    int fd;           /* -1: none */
    int hello;        /* its 'a' arrived: pos is valid */
    int ending;       /* nothing more after out: close once it is sent */
    u64 pos;          /* next offset to send */
    long long leave;  /* a replaced one is closed at this time */
    unsigned ports_sent;  /* the ports_gen it was last sent (0: none yet) */
    size_t olen, ooff, rlen;
    unsigned char out[5 + MAXMSG + 16];
    unsigned char in[5 + MAXMSG];
};

static struct conn conns[2], *cur = &conns[0], *old = &conns[1];
static unsigned char *ring, *inbuf;
static u64 cap, rstart, rend;  /* the ring holds offsets [rstart, rend) */
static size_t inlen;
static int mfd = -1, done, status;

/* TCP attachments (-t): the listener, the secret they must send first, and
 * the connections that have not yet sent it. */
static int tcp_fd = -1;
static unsigned char secret[SECRET];
struct pending {
    int fd;           /* -1: free */
    long long until;  /* closed at this time if it has not proved itself */
    size_t len;
    unsigned char in[5 + SECRET];
};
static struct pending pend[PENDING];

/* ---- the screen across a stop (see "The screen across a stop" at the top) - */

static const char *screen_path;  /* CAPSULE_KEEPER_SCREEN, or NULL: none */
static u64 saved_end;            /* rend when the ring was last saved */
static long long saved_at = -SAVE_MS;  /* when (ms) */

/* Appends n bytes to the ring, as output: the oldest go past cap. */
static void ring_put(const unsigned char *d, size_t n)
{
    while (n) {
        size_t at = rend % cap, k = cap - at;
        if (k > n) k = n;
        memcpy(ring + at, d, k);
        rend += k;
        d += k;
        n -= k;
    }
    if (rend - rstart > cap) rstart = rend - cap;
}

/* Makes the directories of path's parents that are missing (0700). */
static void make_dirs(const char *file)
{
    char path[4096];
    snprintf(path, sizeof path, "%s", file);
    for (char *s = strchr(path + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = 0;
        mkdir(path, 0700);
        *s = '/';
    }
}

/* The offset of a screen file's first byte after its header, and the
 * header's length in *len; 0 with *len 0 if it has none (or one that is
 * not exactly right). */
static u64 screen_header(const unsigned char *h, size_t n, size_t *len)
{
    static const char tag[] = "\033_capsule-screen;start=";
    size_t t = sizeof tag - 1, i = t;
    u64 start = 0;
    *len = 0;
    if (n < t || memcmp(h, tag, t)) return 0;
    while (i < n && i - t < 16 && h[i] >= '0' && h[i] <= '9') start = start * 10 + (u64)(h[i++] - '0');
    if (i == t || i + 2 > n || h[i] != '\033' || h[i + 1] != '\\' || start > SCREEN_MAX_END)
        return 0;
    *len = i + 2;
    return start;
}

/* At the server's start: the saved screen, if there is one, becomes the
 * ring's first output, then the marker.  Returns whether it did. */
static int screen_load(void)
{
    int fd = open(screen_path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) return 0;
    struct stat st;
    unsigned char head[SCREEN_HEAD];
    ssize_t h;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= 0
        || (h = pread(fd, head, sizeof head, 0)) <= 0) {
        close(fd);
        return 0;
    }
    size_t hlen;
    u64 size = (u64)st.st_size, start = screen_header(head, (size_t)h, &hlen);
    u64 body = size > hlen ? size - hlen : 0, n = body < cap ? body : cap;
    /* The bytes loaded end at start + body (no header: at n, from 0). */
    u64 end = hlen && body <= SCREEN_MAX_END ? start + body : n;
    rstart = rend = end - n;
    static unsigned char chunk[65536];
    u64 got = 0;
    while (got < n) {
        size_t want = n - got < sizeof chunk ? (size_t)(n - got) : sizeof chunk;
        ssize_t k = pread(fd, chunk, want, (off_t)(size - n + got));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;  /* it shrank meanwhile: what came is loaded */
        ring_put(chunk, (size_t)k);
        got += (u64)k;
    }
    close(fd);
    if (!got) return 0;
    char when[32], mark[320];
    time_t t = time(NULL);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || !strftime(when, sizeof when, "%Y-%m-%d %H:%M UTC", &tm))
        strcpy(when, "(time unknown)");
    /* CAN ends an escape sequence the saved screen may have been cut in;
     * the normal screen buffer, a soft reset, and no mouse reports or
     * bracketed paste: the new shell starts on a terminal as a shell
     * expects it, whatever ran before.  Then the line, dim. */
    int k = snprintf(mark, sizeof mark,
                     "\030\033[?1047l\033[!p\033[?1000l\033[?1002l\033[?1003l\033[?1006l"
                     "\033[?2004l\r\n\033[0m\033[2m\342\224\200\342\224\200 resumed %s: the"
                     " screen above is from before the session was put away"
                     " \342\224\200\342\224\200\033[0m\r\n", when);
    ring_put((const unsigned char *)mark, (size_t)k);
    return 1;
}

static int write_file(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k < 0 && errno == EINTR) continue;
        return -1;
    }
    return 0;
}

/* Writes the ring's offsets [from, rend) to fd; from is held. */
static int write_ring(int fd, u64 from)
{
    size_t at = from % cap, n = rend - from, first = n < cap - at ? n : cap - at;
    return write_file(fd, ring + at, first) < 0 || write_file(fd, ring, n - first) < 0 ? -1 : 0;
}

/* The file as the keeper last left it: its inode and size, and the offset
 * that follows its last byte (file_size 0: none known). */
static ino_t file_ino;
static dev_t file_dev;
static u64 file_size, file_end;

/* Writes the screen file anew: a new file beside it, renamed over it. */
static void screen_rewrite(void)
{
    char tmp[4096 + 32], head[SCREEN_HEAD];
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", screen_path, (long)getpid());
    make_dirs(screen_path);
    unlink(tmp);  /* a leftover, or anything put there: ours is made anew */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
    if (fd < 0) return;
    int hn = snprintf(head, sizeof head, "\033_capsule-screen;start=%llu\033\\", rstart);
    struct stat st;
    int bad = write_file(fd, (const unsigned char *)head, (size_t)hn) < 0
              || write_ring(fd, rstart) < 0 || fstat(fd, &st) < 0;
    if (close(fd) < 0 || bad || rename(tmp, screen_path) < 0) {
        unlink(tmp);
        return;
    }
    file_ino = st.st_ino;
    file_dev = st.st_dev;
    file_size = (u64)hn + (rend - rstart);
    file_end = rend;
}

/* Saves the ring.  The output since the last save is appended to the file
 * the keeper left, if it is still that one (its inode and size) and holds
 * at most twice the ring; else the file is written anew.  So a session
 * that prints costs the disk about what it prints, not the ring each time.
 * Whatever comes of it, what is in the ring now counts as saved (a full
 * disk is tried again at the next output, not in a loop). */
static void screen_save(long long now)
{
    saved_end = rend;
    saved_at = now;
    struct stat st;
    if (lstat(screen_path, &st) == 0 && !S_ISREG(st.st_mode))
        return;  /* a link, a directory, a device...: not the keeper's to replace */
    if (file_size && file_end >= rstart && file_end <= rend
        && file_size + (rend - file_end) <= SCREEN_HEAD + 2 * cap) {
        int fd = open(screen_path, O_WRONLY | O_APPEND | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd >= 0) {
            int ours = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_ino == file_ino
                       && st.st_dev == file_dev && (u64)st.st_size == file_size;
            int ok = ours && write_ring(fd, file_end) == 0;
            if (close(fd) == 0 && ok) {
                file_size += rend - file_end;
                file_end = rend;
                return;
            }
        }
    }
    screen_rewrite();
}

/* Whether the ring has output the screen file does not. */
static int screen_dirty(void)
{
    return screen_path && rend != saved_end;
}

/* CAPSULE_KEEPER_SCREEN, if it is an absolute path of a sane length. */
static const char *screen_wanted(void)
{
#ifdef CAPSULE_KEEPER_NO_SCREEN
    return NULL;  /* a keeper as those before this: the variable means nothing */
#endif
    const char *s = getenv(SCREEN_ENV);
    return s && s[0] == '/' && strlen(s) < 4000 ? s : NULL;
}

/* Flood batching for the current attachment (see the top): the bytes sent
 * in this WINDOW_US and the one before, and since when output has waited. */
static long long win_start, pending_since = -1, clock_us;
static u64 win_sent, prev_sent;

static int flooding(void)
{
    if (clock_us - win_start >= WINDOW_US) {
        prev_sent = clock_us - win_start < 2 * WINDOW_US ? win_sent : 0;
        win_sent = 0;
        win_start = clock_us;
    }
    return win_sent + prev_sent > FLOOD_BYTES;
}

/* ---- ports ('P'; see "Ports" at the top) ------------------------------- */

static unsigned char ports_on[65536 / 8];  /* a bit per port: listening */
static unsigned char ports_payload[2 + 2 * MAX_PORTS];
static size_t ports_len;   /* of ports_payload */
static unsigned ports_gen; /* bumped at each change of ports_payload; 0: never read */
static long long ports_next;  /* when the table is read next (ms) */

/* The server's own TCP port (-t), which is not the session's: 0 if none. */
static unsigned own_port(void)
{
    struct sockaddr_in a;
    socklen_t n = sizeof a;
    if (tcp_fd < 0 || getsockname(tcp_fd, (struct sockaddr *)&a, &n) < 0) return 0;
    return ntohs(a.sin_port);
}

/* Docker's embedded DNS server listens in the container's namespace on
 * 127.0.0.11 (a port of its choosing): not the session's.  As the kernel
 * says it, and as /proc/net/tcp writes it. */
#define DOCKER_DNS 0x7f00000bU
#define DOCKER_DNS_HEX "0B00007F"

static void ports_mark(unsigned port, unsigned skip)
{
    if (port > 0 && port < 65536 && port != skip)
        ports_on[port >> 3] |= (unsigned char)(1 << (port & 7));
}

/* Marks the TCP ports listening for family (AF_INET, AF_INET6), as the
 * kernel's sock_diag tells them: it walks only the listening sockets (the
 * /proc tables walk every connection of the host).  -1: it could not be
 * asked (no netlink). */
static int ports_diag(int family, unsigned skip)
{
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -1;
    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 r;
    } req;
    memset(&req, 0, sizeof req);
    req.nlh.nlmsg_len = sizeof req;
    req.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    req.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.r.sdiag_family = (unsigned char)family;
    req.r.sdiag_protocol = IPPROTO_TCP;
    req.r.idiag_states = 1U << 10;  /* TCP_LISTEN */
    struct sockaddr_nl nl = {.nl_family = AF_NETLINK};
    if (sendto(fd, &req, sizeof req, 0, (struct sockaddr *)&nl, sizeof nl) < 0) {
        close(fd);
        return -1;
    }
    static long buf[4096];  /* aligned for the messages */
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        int len = (int)n;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type == NLMSG_DONE) {
                close(fd);
                return 0;
            }
            if (h->nlmsg_type == NLMSG_ERROR) goto failed;
            if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY
                || h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
                continue;
            struct inet_diag_msg *m = NLMSG_DATA(h);
            if (m->idiag_state != 10) continue;
            if (family == AF_INET && m->id.idiag_src[0] == htonl(DOCKER_DNS)) continue;
            ports_mark(ntohs(m->id.idiag_sport), skip);
        }
    }
failed:
    close(fd);
    return -1;
}

/* The same from one /proc/net/tcp* table (LISTEN is state 0A), where there
 * is no sock_diag. */
static void ports_read(const char *path, unsigned skip)
{
    FILE *f = fopen(path, "re");
    if (!f) return;
    char line[512], addr[40];
    while (fgets(line, sizeof line, f)) {
        unsigned port, state;
        if (sscanf(line, " %*[0-9]: %39[0-9A-Fa-f]:%x %*[0-9A-Fa-f]:%*x %x", addr, &port,
                   &state) == 3
            && state == 0x0A && strcmp(addr, DOCKER_DNS_HEX))
            ports_mark(port, skip);
    }
    fclose(f);
}

/* Reads the socket table; a new payload if the set changed. */
static void ports_scan(void)
{
    unsigned char pay[sizeof ports_payload];
    unsigned n = 0, more = 0;
    memset(ports_on, 0, sizeof ports_on);
    unsigned skip = own_port();
#ifdef PORTS_FROM_PROC
    int from_proc = 1;  /* a build that tests the fallback */
#else
    int from_proc = 0;
#endif
    if (from_proc || ports_diag(AF_INET, skip) < 0 || ports_diag(AF_INET6, skip) < 0) {
        memset(ports_on, 0, sizeof ports_on);
        ports_read("/proc/net/tcp", skip);
        ports_read("/proc/net/tcp6", skip);
    }
    for (unsigned byte = 0; byte < sizeof ports_on; byte++) {
        if (!ports_on[byte]) continue;
        for (unsigned bit = 0; bit < 8; bit++) {
            if (!(ports_on[byte] >> bit & 1)) continue;
            if (n < MAX_PORTS) put_be(pay + 2 + 2 * n++, byte * 8 + bit, 2);
            else more++;
        }
    }
    put_be(pay, more, 2);
    size_t len = 2 + 2 * (size_t)n;
    if (ports_gen && len == ports_len && !memcmp(pay, ports_payload, len)) return;
    memcpy(ports_payload, pay, len);
    ports_len = len;
    if (!++ports_gen) ports_gen = 1;
}

/* Reads the table if it is due and someone is attached; returns when it is
 * due next (ms), or -1 while nobody is attached (read at once on an attach).
 * It is due PORTS_MS after the last read, or PORTS_IDLE_MS after it while
 * COMMAND has printed nothing for PORTS_QUIET_MS (a server that starts
 * mostly says so, or follows a command typed, which is echoed). */
static long long ports_due(long long now)
{
    static u64 seen_end;
    static long long last_read, active_at;
    if (rend != seen_end || !active_at) {  /* output, or the server's start */
        seen_end = rend;
        active_at = now;
    }
    if (cur->fd < 0 || !cur->hello) { ports_next = 0; return -1; }
    if (ports_next) ports_next = last_read + (now - active_at < PORTS_QUIET_MS ? PORTS_MS : PORTS_IDLE_MS);
    if (now >= ports_next) {
        ports_scan();
        last_read = now;
        ports_next = now + PORTS_MS;
    }
    return ports_next;
}

/* Queues a 'P' frame for c if it has not had the newest; returns whether. */
static int ports_fill(struct conn *c)
{
    if (c != cur || !ports_gen || c->ports_sent == ports_gen) return 0;
    c->olen = frame(c->out, 'P', ports_payload, ports_len);
    c->ports_sent = ports_gen;
    return 1;
}

/* Whether c's next output should wait for more. */
static int holding(struct conn *c)
{
    if (c != cur || done || c->pos >= rend || rend - c->pos >= MAXMSG) return 0;
    if (pending_since < 0) pending_since = clock_us;
    return flooding() && clock_us - pending_since < HOLD_US;
}

/* ---- channels ------------------------------------------------------------
 *
 * TCP connections carried over the attachment's stream (see "Channels" at
 * the top).  Everything here is apart from the shell's path: the server
 * calls chan_reset when its attachment changes, chan_frame_ok and
 * chan_receive for the attachment's channel frames, chan_fill when the
 * attachment can take a frame, and chan_poll / chan_events around its poll.
 */

#define CHANNELS 32         /* channels open at once (both directions together) */
#define CHUNK 16384         /* largest data in one 'D' frame: fair turns with the shell */
#define CWINDOW 131072      /* bytes a side may send on a channel before the other grants more */
#define REASON 200          /* longest reason in an 'F' frame */
#define CHAN_ENV "CAPSULE_KEEPER_CHANNELS"

struct chan {
    uint32_t id;
    int fd;              /* the in-container socket; -1 once closed */
    int connecting;      /* capsule's 'C': the connect is under way */
    int announce;        /* an accepted connection: 'C' to send */
    int ack;             /* connected: 'A' to send */
    int eof_in;          /* the socket's reading side ended: 'E' once up is sent */
    int eof_sent;
    int eof_out;         /* capsule's 'E': shut the socket's writing once down is written */
    int shut;
    int fail;            /* 'F' with reason to send, then the channel goes */
    uint16_t port;
    u64 credit;          /* bytes capsule may still be sent */
    u64 grant;           /* bytes written to the socket, not yet granted back */
    size_t ulen, dlen, doff;
    char reason[REASON];
    unsigned char up[CHUNK];       /* socket -> capsule: one 'D' frame */
    unsigned char down[CWINDOW];   /* capsule -> socket: at most a window */
};

static struct chan *chans[CHANNELS];
static int chan_on;        /* the current attachment speaks channels */
static int door_fd = -1;   /* 127.0.0.1:door, whose connections become channels */
static uint16_t door_port;
static uint32_t chan_next = 1;   /* the keeper's ids: 1 .. 2^31-1; capsule's have the top bit */
static int chan_rr, chan_turn;   /* round-robin over channels; whose turn, shell or channels */
static unsigned refused;         /* door connections refused since the last notice */
static uint32_t refuse_ids[CHANNELS];  /* capsule's opens refused past the cap: 'F' to send */
static int nrefuse;

static void chan_free(int i)
{
    struct chan *ch = chans[i];
    if (!ch) return;
    if (ch->fd >= 0) close(ch->fd);
    free(ch);
    chans[i] = NULL;
}

/* The attachment changed: every channel ends (their sockets close). */
static void chan_reset(void)
{
    for (int i = 0; i < CHANNELS; i++) chan_free(i);
    chan_on = 0;
    refused = 0;
    nrefuse = 0;
}

static struct chan *chan_find(uint32_t id)
{
    for (int i = 0; i < CHANNELS; i++)
        if (chans[i] && chans[i]->id == id) return chans[i];
    return NULL;
}

static struct chan *chan_new(uint32_t id, int fd, uint16_t port)
{
    for (int i = 0; i < CHANNELS; i++) {
        if (chans[i]) continue;
        struct chan *ch = malloc(sizeof *ch);
        if (!ch) return NULL;
        memset(ch, 0, offsetof(struct chan, up));
        ch->id = id;
        ch->fd = fd;
        ch->port = port;
        ch->credit = CWINDOW;
        chans[i] = ch;
        return ch;
    }
    return NULL;
}

/* The channel ends with 'F' and reason (its socket closes now). */
static void chan_fail(struct chan *ch, const char *fmt, ...)
{
    if (ch->fail) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ch->reason, sizeof ch->reason, fmt, ap);
    va_end(ap);
    ch->fail = 1;
    if (ch->fd >= 0) close(ch->fd);
    ch->fd = -1;
}

/* Which channel frames capsule may send, of which sizes. */
static int chan_frame_ok(unsigned char type, u64 len)
{
    switch (type) {
    case 'C': return len == 6;
    case 'D': return len >= 4 && len <= 4 + CHUNK;
    case 'E': return len == 4;
    case 'F': return len >= 4 && len <= 4 + REASON;
    case 'G': return len == 8;
    default: return 0;
    }
}

/* Opens capsule's channel id to 127.0.0.1:port (the answer is 'A' or 'F'). */
static void chan_open(uint32_t id, uint16_t port)
{
    struct chan *ch;
    if (!(id & 0x80000000u)) return;  /* not an id capsule may choose */
    if ((ch = chan_find(id)) != NULL) {
        chan_fail(ch, "channel %u opened twice", id);
        return;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    ch = chan_new(id, fd, port);
    if (!ch) {
        if (fd >= 0) close(fd);
        if (nrefuse < CHANNELS) refuse_ids[nrefuse++] = id;
        return;
    }
    if (fd < 0) { chan_fail(ch, "socket: %s", strerror(errno)); return; }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr = {htonl(INADDR_LOOPBACK)}};
    if (port == 0) { chan_fail(ch, "port 0"); return; }
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) ch->ack = 1;
    else if (errno == EINPROGRESS) ch->connecting = 1;
    else chan_fail(ch, "connecting to 127.0.0.1:%u: %s", port, strerror(errno));
}

/* A channel frame from capsule (chan_frame_ok said yes). */
static void chan_receive(unsigned char type, const unsigned char *d, size_t len)
{
    uint32_t id = (uint32_t)get_be(d, 4);
    if (type == 'C') { chan_open(id, (uint16_t)get_be(d + 4, 2)); return; }
    struct chan *ch = chan_find(id);
    if (!ch || ch->fail) return;  /* it ended meanwhile: what was on its way goes */
    if (type == 'F') {
        for (int i = 0; i < CHANNELS; i++) if (chans[i] == ch) chan_free(i);
    } else if (type == 'G') {
        ch->credit += get_be(d + 4, 4);
        if (ch->credit > CWINDOW) chan_fail(ch, "granted past the window");
    } else if (type == 'E') {
        ch->eof_out = 1;
        if (ch->dlen == ch->doff && ch->fd >= 0 && !ch->connecting) {
            shutdown(ch->fd, SHUT_WR);
            ch->shut = 1;
        }
    } else if (type == 'D') {
        len -= 4;
        if (ch->eof_out) { chan_fail(ch, "data after its end"); return; }
        if (ch->doff) {
            memmove(ch->down, ch->down + ch->doff, ch->dlen - ch->doff);
            ch->dlen -= ch->doff;
            ch->doff = 0;
        }
        if (len > CWINDOW - ch->dlen) { chan_fail(ch, "more data than the window"); return; }
        memcpy(ch->down + ch->dlen, d + 4, len);
        ch->dlen += len;
    }
}

/* Queues a channel's frame in c->out: its control frames first (any
 * channel's), and data ('D') only when data is 1.  Returns whether it did. */
static int chan_fill(struct conn *c, int data)
{
    unsigned char h[4 + REASON + 4];
    for (int i = 0; i < CHANNELS; i++) {
        struct chan *ch = chans[i];
        if (!ch) continue;
        if (ch->eof_sent && ch->shut && !ch->fail && !ch->ack) {
            chan_free(i);  /* both ways ended */
            continue;
        }
        put_be(h, ch->id, 4);
        if (ch->announce) {
            put_be(h + 4, ch->port, 2);
            c->olen = frame(c->out, 'C', h, 6);
            ch->announce = 0;
        } else if (ch->fail) {
            size_t n = strlen(ch->reason);
            memcpy(h + 4, ch->reason, n);
            c->olen = frame(c->out, 'F', h, 4 + n);
            chan_free(i);
        } else if (ch->ack) {
            c->olen = frame(c->out, 'A', h, 4);
            ch->ack = 0;
        } else if (ch->grant >= CWINDOW / 4 || (ch->grant && ch->dlen == ch->doff)) {
            put_be(h + 4, ch->grant, 4);
            c->olen = frame(c->out, 'G', h, 8);
            ch->grant = 0;
        } else if (ch->eof_in && !ch->eof_sent && !ch->ulen) {
            c->olen = frame(c->out, 'E', h, 4);
            ch->eof_sent = 1;
        } else {
            continue;
        }
        c->ooff = 0;
        return 1;
    }
    for (int k = 0; data && k < CHANNELS; k++) {
        int i = (chan_rr + k) % CHANNELS;
        struct chan *ch = chans[i];
        if (!ch || !ch->ulen) continue;
        unsigned char *p = c->out;
        p[0] = 'D';
        put_be(p + 1, 4 + ch->ulen, 4);
        put_be(p + 5, ch->id, 4);
        memcpy(p + 9, ch->up, ch->ulen);
        c->olen = 9 + ch->ulen;
        c->ooff = 0;
        ch->ulen = 0;
        chan_rr = (i + 1) % CHANNELS;
        return 1;
    }
    return 0;
}

/* The door's connection: a channel of the keeper's, announced with 'C'.
 * Past the cap (or with no attachment that speaks channels), it is closed,
 * and capsule is told how many were with an 'F' of channel 0. */
static void chan_accept(void)
{
    int fd = accept4(door_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    struct chan *ch = chan_on ? chan_new(chan_next, fd, door_port) : NULL;
    if (!ch) {
        close(fd);
        if (chan_on) refused++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ch->announce = 1;
    chan_next = chan_next >= 0x7fffffffu ? 1 : chan_next + 1;
}

/* A notice of refused connections, if any, as 'F' of channel 0. */
static int chan_notice(struct conn *c)
{
    char text[REASON];
    unsigned char h[4 + REASON] = {0};
    if (nrefuse) {
        put_be(h, refuse_ids[--nrefuse], 4);
        int k = snprintf(text, sizeof text, "%d channels are open (at most %d)", CHANNELS, CHANNELS);
        memcpy(h + 4, text, (size_t)k);
        c->olen = frame(c->out, 'F', h, 4 + (size_t)k);
        c->ooff = 0;
        return 1;
    }
    if (!refused) return 0;
    int n = snprintf(text, sizeof text, "refused %u connection(s) on port %u: %d channels are open"
                     " (at most %d)", refused, door_port, CHANNELS, CHANNELS);
    memcpy(h + 4, text, (size_t)n);
    c->olen = frame(c->out, 'F', h, 4 + (size_t)n);
    c->ooff = 0;
    refused = 0;
    return 1;
}

/* Poll entries for the door and the channels' sockets, at p[0 .. 1 + CHANNELS). */
static void chan_poll(struct pollfd *p)
{
    p[0].fd = door_fd;
    p[0].events = POLLIN;
    for (int i = 0; i < CHANNELS; i++) {
        struct chan *ch = chans[i];
        short ev = 0;
        if (ch && ch->fd >= 0 && !ch->fail) {
            if (ch->connecting) ev = POLLOUT;
            else {
                if (!ch->eof_in && !ch->ulen && ch->credit) ev |= POLLIN;
                if (ch->dlen > ch->doff) ev |= POLLOUT;
            }
        }
        p[1 + i].fd = ev ? ch->fd : -1;
        p[1 + i].events = ev;
    }
}

/* Handles what poll said of the door and the channels' sockets. */
static void chan_events(struct pollfd *p)
{
    for (int i = 0; i < CHANNELS; i++) {
        struct chan *ch = chans[i];
        short re = p[1 + i].revents;
        if (!ch || p[1 + i].fd < 0 || p[1 + i].fd != ch->fd || !re) continue;
        if (ch->connecting) {
            int err = 0;
            socklen_t n = sizeof err;
            getsockopt(ch->fd, SOL_SOCKET, SO_ERROR, &err, &n);
            if (err) { chan_fail(ch, "connecting to 127.0.0.1:%u: %s", ch->port, strerror(err)); continue; }
            ch->connecting = 0;
            ch->ack = 1;
            if (ch->eof_out && ch->dlen == ch->doff) { shutdown(ch->fd, SHUT_WR); ch->shut = 1; }
            continue;
        }
        if (p[1 + i].events & POLLIN && re & (POLLIN | POLLHUP | POLLERR)) {
            size_t want = ch->credit < CHUNK ? (size_t)ch->credit : CHUNK;
            ssize_t n = read(ch->fd, ch->up, want);
            if (n > 0) { ch->ulen = (size_t)n; ch->credit -= (u64)n; }
            else if (n == 0) ch->eof_in = 1;
            else if (errno != EINTR && errno != EAGAIN) { chan_fail(ch, "reading: %s", strerror(errno)); continue; }
        }
        if (p[1 + i].events & POLLOUT && re & (POLLOUT | POLLHUP | POLLERR)) {
            ssize_t n = send(ch->fd, ch->down + ch->doff, ch->dlen - ch->doff, MSG_NOSIGNAL);
            if (n > 0) {
                ch->doff += (size_t)n;
                ch->grant += (u64)n;
                if (ch->doff == ch->dlen) ch->doff = ch->dlen = 0;
                if (!ch->dlen && ch->eof_out && !ch->shut) { shutdown(ch->fd, SHUT_WR); ch->shut = 1; }
            } else if (n < 0 && errno != EINTR && errno != EAGAIN) {
                chan_fail(ch, "writing: %s", strerror(errno));
                continue;
            }
        }
        /* both ways ended: it goes once its 'E' and grants are sent (chan_fill) */
    }
    if (door_fd >= 0 && p[0].revents & POLLIN) chan_accept();
}

/* The door listener on 127.0.0.1:port (-1, and nothing else, if it cannot be had). */
static int chan_listener(u64 port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr = {htonl(INADDR_LOOPBACK)}};
    int one = 1, l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (l >= 0) setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 16) < 0) {
        if (l >= 0) close(l);
        return -1;
    }
    door_port = (uint16_t)port;
    return l;
}

/* CAPSULE_KEEPER_CHANNELS: unset, no channels; else the door's port (0: none). */
static int chan_wanted(u64 *port)
{
#ifdef CAPSULE_KEEPER_NO_CHANNELS
    /* A keeper as those before channels were: the variable means nothing
     * (tests build one to check that capsule works with it). */
    (void)port;
    return 0;
#endif
    const char *s = getenv(CHAN_ENV);
    if (!s) return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    *port = *s && !*end && !errno && v <= 65535 ? v : 0;
    return 1;
}

static void conn_close(struct conn *c)
{
    if (c->fd < 0) return;
    if (c == cur) chan_reset();
    close(c->fd);
    c->fd = -1;
    c->hello = c->ending = 0;
    c->olen = c->ooff = c->rlen = 0;
    c->ports_sent = 0;
}

static void set_size(u64 cols, u64 rows)
{
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    if (cols && rows && mfd >= 0) ioctl(mfd, TIOCSWINSZ, &ws);
}

/* Queues c's next frame of the shell's; returns whether there was one. */
static int fill_shell(struct conn *c)
{
    if (c->pos < rend) {
        if (holding(c)) return 0;
        size_t at = c->pos % cap, n = rend - c->pos;
        if (n > cap - at) n = cap - at;
        if (n > MAXMSG) n = MAXMSG;
        c->olen = frame(c->out, 'o', ring + at, n);
        c->pos += n;
        if (c == cur) {
            win_sent += n;
            pending_since = c->pos < rend ? clock_us : -1;
        }
    } else if (done) {
        unsigned char st[4];
        put_be(st, (u64)status, 4);
        c->olen = frame(c->out, 'x', st, 4);
        c->ending = 1;
    } else {
        return 0;
    }
    c->ooff = 0;
    return 1;
}

/* Queues the next frame for c; returns whether there was one.  With
 * channels, the shell's output and the channels' data take turns (control
 * frames, small, go first). */
static int fill(struct conn *c)
{
    if (!c->hello) return 0;
    if (ports_fill(c)) { c->ooff = 0; return 1; }
    int chan = c == cur && chan_on;
    if (chan && (chan_notice(c) || chan_fill(c, chan_turn))) {
        if (c->out[0] == 'D') chan_turn = 0;
        return 1;
    }
    if (fill_shell(c)) {
        chan_turn = 1;
        return 1;
    }
    return chan && chan_fill(c, 1);
}

/* Sends what c has to send until the socket is full. */
static void pump(struct conn *c)
{
    while (c->fd >= 0) {
        if (c->ooff == c->olen) {
            c->olen = c->ooff = 0;
            if (c->ending) { conn_close(c); return; }
            if (!fill(c)) return;
        }
        ssize_t n = send(c->fd, c->out + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
        if (n > 0) c->ooff += (size_t)n;
        else if (n < 0 && errno == EINTR) continue;
        else if (n < 0 && errno == EAGAIN) return;
        else { conn_close(c); return; }
    }
}

/* Whether a frame of this type and length may come from an attachment that
 * has (hello) or has not yet sent its 'a': its frames are 'a' first, once,
 * then 'i' and 'w' only. */
static int frame_ok(int hello, unsigned char type, u64 len)
{
    if (!hello) return type == 'a' && (len == 12 || len == 13);
    return (type == 'i' && len <= MAXMSG) || (type == 'w' && len == 4)
           || (chan_on && chan_frame_ok(type, len));
}

/* Reads and handles what the attachment sent.  A frame it may not send ends
 * it (fail closed): nothing of that frame or after it reaches COMMAND. */
static void receive(struct conn *c)
{
    ssize_t n = read(c->fd, c->in + c->rlen, sizeof c->in - c->rlen);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) { conn_close(c); return; }
    c->rlen += (size_t)n;
    size_t off = 0;
    while (c->rlen - off >= 5) {
        unsigned char *p = c->in + off, *d = p + 5;
        size_t len = get_be(p + 1, 4);
        if (!frame_ok(c->hello, p[0], len)) { conn_close(c); return; }
        if (c->rlen - off < 5 + len) break;
        off += 5 + len;
        if (p[0] == 'i' && mfd >= 0) {
            memcpy(inbuf + inlen, d, len);  /* room: read only with MAXMSG free */
            inlen += len;
        } else if (p[0] == 'w') {
            set_size(get_be(d, 2), get_be(d + 2, 2));
        } else if (p[0] == 'a') {
            u64 want = get_be(d, 8), s = want < rstart ? rstart : want;
            if (s > rend) s = rend;
            chan_on = c == cur && len == 13 && (d[12] & 1);
            char pre[128], more[32] = "";
            if (chan_on) snprintf(more, sizeof more, ";channels=%d", CHANNELS);
            int k = snprintf(pre, sizeof pre, "\033_capsule-keeper;offset=%llu;dropped=%llu%s\033\\",
                             s, want < rstart ? s - want : 0, more);
            c->olen = frame(c->out, 'o', pre, (size_t)k);
            c->ooff = 0;
            c->pos = s;
            c->hello = 1;
            set_size(get_be(d + 8, 2), get_be(d + 10, 2));
        } else if (p[0] != 'i' && p[0] != 'w') {
            chan_receive(p[0], d, len);
        }
    }
    memmove(c->in, c->in + off, c->rlen - off);
    c->rlen -= off;
}

/* Makes fd the current attachment, replacing the one in place. */
static void adopt(int fd, long long now)
{
    conn_close(old);
    chan_reset();
    if (cur->fd >= 0) {  /* replace it: it gets 'k' after what it was sent */
        struct conn *t = old;
        old = cur;
        cur = t;
        if (!old->ending) old->olen += frame(old->out + old->olen, 'k', NULL, 0);
        old->ending = 1;
        old->leave = now + LEAVE_MS;
        pump(old);
    }
    cur->fd = fd;
    pending_since = -1;
}

static void accept_one(int lfd, long long now)
{
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0) return;
    setfl(fd, 1, 1);
    adopt(fd, now);
}

/* A TCP connection: it waits, apart from the attachments, for its secret. */
static void accept_tcp(long long now)
{
    int fd = accept(tcp_fd, NULL, NULL);
    if (fd < 0) return;
    setfl(fd, 1, 1);
    for (int i = 0; i < PENDING; i++) {
        if (pend[i].fd >= 0) continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pend[i].fd = fd;
        pend[i].until = now + PENDING_MS;
        pend[i].len = 0;
        return;
    }
    close(fd);  /* too many waiting */
}

static void pending_close(struct pending *q)
{
    close(q->fd);
    q->fd = -1;
}

/* Reads what a waiting TCP connection sent (never more than its 's' frame):
 * the right secret makes it the attachment, anything else closes it. */
static void prove(struct pending *q, long long now)
{
    ssize_t n = read(q->fd, q->in + q->len, sizeof q->in - q->len);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) { pending_close(q); return; }
    q->len += (size_t)n;
    if (q->len >= 5 && (q->in[0] != 's' || get_be(q->in + 1, 4) != SECRET)) {
        pending_close(q);
        return;
    }
    if (q->len < sizeof q->in) return;
    unsigned char diff = 0;  /* the same time whatever the bytes */
    for (int i = 0; i < SECRET; i++) diff |= (unsigned char)(q->in[5 + i] ^ secret[i]);
    if (diff) { pending_close(q); return; }
    int fd = q->fd;
    q->fd = -1;
    adopt(fd, now);
}

_Noreturn static void serve(int lfd, const char *sock, ino_t ino, char **cmd, struct winsize *ws)
{
    pid_t pid = forkpty(&mfd, NULL, NULL, ws->ws_col && ws->ws_row ? ws : NULL);
    if (pid < 0) _exit(1);
    if (pid == 0) {
        signal(SIGPIPE, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        unsetenv(CHAN_ENV);  /* the keeper's, not the shell's */
        unsetenv(SCREEN_ENV);
        execvp(cmd[0], cmd);
        fprintf(stderr, "capsule-keeper: %s: %s\n", cmd[0], strerror(errno));
        _exit(127);
    }
    setfl(mfd, 1, 1);
    int reaped = 0;
    long long reaped_at = 0, last_out = 0, idle_since = -1;
    for (;;) {
        clock_us = now_us();
        long long ports_at = ports_due(clock_us / 1000);
        /* output held back by an earlier turn may be due now */
        if (cur->fd >= 0 && cur->hello) pump(cur);
        long long now = clock_us / 1000, wake = -1;
        int attached = cur->fd >= 0 && cur->hello;
        u64 unsent = attached ? rend - cur->pos : 0;
        int room = cur->fd >= 0 && !cur->ending && MAX_INPUT - inlen >= MAXMSG;
        int want_pty = mfd >= 0 && (!attached || unsent < (cap < HIGH_WATER ? cap : HIGH_WATER));
        long long quiet = (reaped_at > last_out ? reaped_at : last_out) + QUIET_MS;
        if (quiet > reaped_at + DRAIN_MAX_MS) quiet = reaped_at + DRAIN_MAX_MS;

        struct pollfd p[6 + PENDING + 1 + CHANNELS] = {{sigfd[0], POLLIN, 0}, {lfd, POLLIN, 0}, {-1, 0, 0}, {-1, 0, 0},
                                        {-1, 0, 0}, {tcp_fd, POLLIN, 0}};
        for (int i = 0; i < PENDING; i++) {
            p[6 + i].fd = pend[i].fd;
            p[6 + i].events = POLLIN;
        }
        chan_poll(p + 6 + PENDING);
        if (mfd >= 0 && (want_pty || inlen)) {
            p[2].fd = mfd;
            p[2].events = (short)((want_pty ? POLLIN : 0) | (inlen ? POLLOUT : 0));
        }
        if (cur->fd >= 0) {
            p[3].fd = room || cur->olen ? cur->fd : -1;
            p[3].events = (short)((room ? POLLIN : 0) | (cur->olen ? POLLOUT : 0));
        }
        if (old->fd >= 0) {
            p[4].fd = old->fd;
            p[4].events = POLLOUT;
            wake = old->leave;
        }
        if (reaped && mfd >= 0 && want_pty && (wake < 0 || quiet < wake)) wake = quiet;
        if (done && idle_since >= 0 && (wake < 0 || idle_since + LINGER_MS < wake))
            wake = idle_since + LINGER_MS;
        for (int i = 0; i < PENDING; i++)
            if (pend[i].fd >= 0 && (wake < 0 || pend[i].until < wake)) wake = pend[i].until;
        if (ports_at >= 0 && (wake < 0 || ports_at < wake)) wake = ports_at;
        if (screen_dirty() && (wake < 0 || saved_at + SAVE_MS < wake)) wake = saved_at + SAVE_MS;
        long long timeout_us = wake < 0 ? -1 : wake <= now ? 0
                               : (wake - now > 60000 ? 60000 : wake - now) * 1000;
        if (attached && !cur->olen && cur->pos < rend && pending_since >= 0) {
            /* output held back (pump would have sent it otherwise): send
             * it once it has waited HOLD_US */
            long long left = pending_since + HOLD_US - clock_us;
            if (left < 0) left = 0;
            if (timeout_us < 0 || left < timeout_us) timeout_us = left;
        }
        struct timespec ts = {timeout_us / 1000000, timeout_us % 1000000 * 1000};
        if (ppoll(p, 6 + PENDING + 1 + CHANNELS, timeout_us < 0 ? NULL : &ts, NULL) < 0 && errno != EINTR) _exit(1);
        clock_us = now_us();
        now = clock_us / 1000;

        char sigs[64];
        int st, signalled = 0, term = 0, hup = 0;
        for (ssize_t n; (n = read(sigfd[0], sigs, sizeof sigs)) > 0;) {
            signalled = 1;
            for (ssize_t i = 0; i < n; i++) {
                term |= sigs[i] == SIGTERM;
                hup |= sigs[i] == SIGHUP;
            }
        }
        if (term) {  /* the screen first; then it ends as it did before it saved one */
            if (screen_dirty()) screen_save(now);
            signal(SIGTERM, SIG_DFL);
            raise(SIGTERM);
            _exit(128 + SIGTERM);
        }
        if (signalled && !reaped && waitpid(pid, &st, WNOHANG) == pid) {
            reaped = 1;
            reaped_at = now;
            status = WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
        }
        if (p[2].revents & POLLOUT || (inlen && p[2].revents & (POLLHUP | POLLERR))) {
            ssize_t n = write(mfd, inbuf, inlen);
            if (n > 0) memmove(inbuf, inbuf + n, inlen -= (size_t)n);
            else if (n < 0 && errno != EINTR && errno != EAGAIN) inlen = 0;
        }
        if (want_pty && p[2].revents & (POLLIN | POLLHUP | POLLERR)) {
            /* Drain what the pty has (a read gives a few KiB at most), up to
             * a budget: fewer, larger frames downstream. */
            for (size_t budget = 4 * MAXMSG; budget > 0;) {
                size_t at = rend % cap, len = cap - at;
                u64 used = attached ? rend - cur->pos : 0;
                u64 free = cap - used;  /* never overwrite unsent bytes */
                if (attached && used >= (cap < 4 * HIGH_WATER ? cap : 4 * HIGH_WATER)) break;
                if (len > free) len = free;
                if (len > budget) len = budget;
                if (len == 0) break;
                ssize_t n = read(mfd, ring + at, len);
                if (n > 0) {
                    rend += (u64)n;
                    if (rend - rstart > cap) rstart = rend - cap;
                    last_out = now;
                    budget -= (size_t)n;
                } else {
                    if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                        close(mfd);  /* EIO: nothing has the pty open any more */
                        mfd = -1;
                    }
                    break;
                }
            }
        }
        if (mfd >= 0 && want_pty && reaped && now >= quiet
            && (!(p[2].revents & POLLIN) || now >= reaped_at + DRAIN_MAX_MS)) {
            close(mfd);  /* COMMAND is gone; what it left behind is quiet */
            mfd = -1;
        }
        if (mfd < 0) inlen = 0;
        done = reaped && mfd < 0;
        if (old->fd >= 0 && (p[4].revents || now >= old->leave)) {
            pump(old);
            if (now >= old->leave) conn_close(old);
        }
        chan_events(p + 6 + PENDING);
        if (room && p[3].revents & (POLLIN | POLLHUP | POLLERR)) receive(cur);
        pump(cur);
        if (p[1].revents & POLLIN) accept_one(lfd, now);
        for (int i = 0; i < PENDING; i++) {
            if (pend[i].fd < 0) continue;
            if (p[6 + i].revents && p[6 + i].fd == pend[i].fd) prove(&pend[i], now);
            if (pend[i].fd >= 0 && now >= pend[i].until) pending_close(&pend[i]);
        }
        if (tcp_fd >= 0 && p[5].revents & POLLIN) accept_tcp(now);
        if (screen_dirty() && (hup || now >= saved_at + SAVE_MS)) screen_save(now);

        if (!done || cur->fd >= 0 || old->fd >= 0) idle_since = -1;
        else if (idle_since < 0) idle_since = now;
        else if (now - idle_since >= LINGER_MS) break;
    }
    if (screen_dirty()) screen_save(now_us() / 1000);
    struct stat sb;
    if (stat(sock, &sb) == 0 && sb.st_ino == ino) unlink(sock);
    _exit(0);
}

/* Starts a server listening on sock; lk is the start lock, held by the caller. */
/* The TCP listener of -t PORT, or -1 (said on stderr) if it cannot be had:
 * the server then serves its UNIX socket only. */
static int tcp_listener(u64 port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr = {htonl(INADDR_ANY)}};
    int one = 1, l = socket(AF_INET, SOCK_STREAM, 0);
    if (l >= 0) setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, PENDING) < 0) {
        fprintf(stderr, "capsule-keeper: no TCP listener on port %llu: %s\n", port, strerror(errno));
        if (l >= 0) close(l);
        return -1;
    }
    setfl(l, 1, 1);
    return l;
}

static int start_server(const char *sock, int lk, u64 bytes, char **cmd, u64 port)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    struct winsize ws = {0};
    struct stat sb;
    strcpy(a.sun_path, sock);
    ioctl(0, TIOCGWINSZ, &ws);
    unlink(sock);  /* stale: nothing listens on it */
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 16) < 0 || stat(sock, &sb) < 0)
        return -1;
    setfl(l, 1, 1);
    tcp_fd = port ? tcp_listener(port) : -1;
    u64 dport = 0;
    if (chan_wanted(&dport) && dport) door_fd = chan_listener(dport);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        setsid();
        pid = fork();
        if (pid != 0) _exit(pid < 0);
        close(lk);
        int null = open("/dev/null", O_RDWR);
        for (int fd = 0; fd < 3; fd++) dup2(null, fd);
        if (null > 2) close(null);
        cap = bytes;
        ring = malloc(cap);
        inbuf = malloc(MAX_INPUT);
        if (!ring || !inbuf || make_sigpipe() < 0) _exit(1);
        conns[0].fd = conns[1].fd = -1;
        for (int i = 0; i < PENDING; i++) pend[i].fd = -1;
        signal(SIGPIPE, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
        catch(SIGCHLD, on_signal);
        if ((screen_path = screen_wanted()) != NULL) {
            /* what was saved is never output the file lacks: only new
             * output (or the marker) makes the ring worth saving */
            saved_end = screen_load() ? ~0ULL : rend;
            catch(SIGHUP, on_signal);   /* save now */
            catch(SIGTERM, on_signal);  /* save, then end */
        }
        serve(l, sock, sb.st_ino, cmd, &ws);
    }
    close(l);
    if (tcp_fd >= 0) close(tcp_fd);
    if (door_fd >= 0) close(door_fd);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* ---- attach -------------------------------------------------------------- */

static struct termios saved;
static int raw;

_Noreturn static void leave(int code, const char *fmt, ...)
{
    if (raw) tcsetattr(0, TCSANOW, &saved);
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        fputs("capsule-keeper: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
    }
    exit(code);
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && errno == EAGAIN) { struct pollfd w = {fd, POLLOUT, 0}; poll(&w, 1, -1); continue; }
        return -1;
    }
    return 0;
}

_Noreturn static void attach(int fd, u64 offset)
{
    static unsigned char sbuf[4 * MAXMSG], rbuf[5 + MAXMSG], tmp[16384];
    size_t slen = 0, rlen = 0;
    struct winsize ws = {0};
    int winch = 0;
    if (make_sigpipe() < 0) leave(255, "pipe: %s", strerror(errno));
    catch(SIGWINCH, on_signal);  /* before reading the size: no change is missed */
    catch(SIGHUP, on_signal);
    catch(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);
    ioctl(0, TIOCGWINSZ, &ws);
    if (isatty(0) && tcgetattr(0, &saved) == 0) {
        struct termios t = saved;
        cfmakeraw(&t);
        raw = tcsetattr(0, TCSANOW, &t) == 0;
    }
    setfl(fd, 1, 1);
    unsigned char hello[12];
    put_be(hello, offset, 8);
    put_be(hello + 8, ws.ws_col, 2);
    put_be(hello + 10, ws.ws_row, 2);
    slen = frame(sbuf, 'a', hello, 12);
    for (;;) {
        int room = sizeof sbuf - slen >= 5 + sizeof tmp + 16;
        struct pollfd p[3] = {{sigfd[0], POLLIN, 0}, {room ? 0 : -1, POLLIN, 0},
                              {fd, (short)(POLLIN | (slen ? POLLOUT : 0)), 0}};
        if (poll(p, 3, -1) < 0 && errno != EINTR) leave(255, "poll: %s", strerror(errno));
        char sigs[64];
        ssize_t n = read(sigfd[0], sigs, sizeof sigs);
        for (ssize_t i = 0; i < n; i++) {
            if (sigs[i] == SIGWINCH) winch = 1;
            else leave(sigs[i] == SIGTERM ? 128 + SIGTERM : DETACHED, NULL);
        }
        if (winch && sizeof sbuf - slen >= 9 && ioctl(0, TIOCGWINSZ, &ws) == 0) {
            unsigned char d[4];
            put_be(d, ws.ws_col, 2);
            put_be(d + 2, ws.ws_row, 2);
            slen += frame(sbuf + slen, 'w', d, 4);
            winch = 0;
        }
        if (p[1].revents) {
            n = read(0, tmp, sizeof tmp);
            if (n > 0) slen += frame(sbuf + slen, 'i', tmp, (size_t)n);
            else if (n == 0 || (errno != EINTR && errno != EAGAIN)) leave(DETACHED, NULL);
        }
        if (p[2].revents & (POLLIN | POLLHUP | POLLERR)) {
            n = read(fd, rbuf + rlen, sizeof rbuf - rlen);
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
                leave(255, "the keeper server went away");
            rlen += n > 0 ? (size_t)n : 0;
            size_t off = 0;
            while (rlen - off >= 5) {
                unsigned char *f = rbuf + off;
                size_t len = get_be(f + 1, 4);
                if (len > MAXMSG) leave(255, "bad message from the keeper server");
                if (rlen - off < 5 + len) break;
                off += 5 + len;
                if (f[0] == 'o' && write_all(1, f + 5, len) < 0) leave(DETACHED, NULL);
                if (f[0] == 'x' && len == 4) leave((int)(get_be(f + 5, 4) & 255), NULL);
                if (f[0] == 'k') leave(254, NULL);
            }
            memmove(rbuf, rbuf + off, rlen - off);
            rlen -= off;
        }
        if (slen && p[2].revents & POLLOUT) {
            n = send(fd, sbuf, slen, MSG_NOSIGNAL);
            if (n > 0) memmove(sbuf, sbuf + n, slen -= (size_t)n);
            else if (n < 0 && errno != EINTR && errno != EAGAIN) leave(255, "the keeper server went away");
        }
    }
}

/* ---- relay (-r) ---------------------------------------------------------- */

/* Sends p[0..n) on the nonblocking fd, waiting at most ms for room. */
static void send_for(int fd, const unsigned char *p, size_t n, int ms)
{
    long long end = now_us() + ms * 1000LL;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k < 0 && errno == EINTR) continue;
        long long left = end - now_us();
        if (k == 0 || errno != EAGAIN || left <= 0) return;
        struct pollfd w = {fd, POLLOUT, 0};
        poll(&w, 1, (int)(left / 1000) + 1);
    }
}

_Noreturn static void relay(int fd, u64 offset)
{
    /* up: stdin -> server; down: server -> stdout.  Each stops being read
     * while its buffer is full, so backpressure flows both ways.  Upward,
     * only whole frames of the kinds a caller may send ('i', 'w') go on:
     * up[0..uok) are such frames, up[uok..ulen) the start of the next. */
    static unsigned char up[4 * MAXMSG], down[4 * MAXMSG];
    size_t ulen, uok, dlen = 0;
    signal(SIGPIPE, SIG_IGN);
    setfl(fd, 1, 1);
    setfl(0, 1, 1);
    setfl(1, 1, 1);
    /* Larger buffers: fewer, larger reads for Docker and for the server.
     * Best effort: a pipe may refuse, the default then stands. */
    int big = 1 << 20;
    fcntl(1, F_SETPIPE_SZ, big);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    /* Channels, if capsule asks for them: the 'a' frame's 13th byte. */
    u64 dport;
    chan_on = chan_wanted(&dport);
    unsigned char hello[13] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    put_be(hello, offset, 8);
    ulen = uok = frame(up, 'a', hello, chan_on ? 13 : 12);
    for (;;) {
        struct pollfd p[3] = {
            {ulen < sizeof up ? 0 : -1, POLLIN, 0},
            {fd, (short)((dlen < sizeof down ? POLLIN : 0) | (uok ? POLLOUT : 0)), 0},
            {dlen ? 1 : -1, POLLOUT, 0}};
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR) continue;
            leave(255, "poll: %s", strerror(errno));
        }
        ssize_t n;
        if (p[0].revents) {
            n = read(0, up + ulen, sizeof up - ulen);
            if (n > 0) {
                ulen += (size_t)n;
                /* A frame fits: 5 + MAXMSG < sizeof up. */
                while (ulen - uok >= 5) {
                    unsigned char type = up[uok];
                    u64 len = get_be(up + uok + 1, 4);
                    if (!frame_ok(1, type, len)) {
                        /* What came before it still goes; it and what follows do not. */
                        send_for(fd, up, uok, 1000);
                        leave(255, "refused a frame on stdin: type 0x%02x ('%c'), %llu bytes;"
                              " only 'i' of at most %d bytes and 'w' of 4 may come%s",
                              type, type > 32 && type < 127 ? type : '?', len, MAXMSG,
                              chan_on ? " (and channel frames of their sizes)" : "");
                    }
                    if (ulen - uok < 5 + len) break;
                    uok += 5 + len;
                }
            } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                send_for(fd, up, uok, 1000);
                if (ulen > uok)
                    leave(255, "stdin ended inside a frame (%zu bytes of it came); it was dropped",
                          ulen - uok);
                leave(DETACHED, NULL);
            }
        }
        if (p[1].revents & (POLLIN | POLLHUP | POLLERR) && dlen < sizeof down) {
            n = read(fd, down + dlen, sizeof down - dlen);
            if (n > 0) dlen += (size_t)n;
            else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                if (write_all(1, down, dlen) < 0) leave(DETACHED, NULL);
                leave(0, NULL);
            }
        }
        if (uok && p[1].revents & POLLOUT) {
            n = send(fd, up, uok, MSG_NOSIGNAL);
            if (n > 0) {
                memmove(up, up + n, ulen - (size_t)n);
                ulen -= (size_t)n;
                uok -= (size_t)n;
            } else if (n < 0 && errno != EINTR && errno != EAGAIN) {
                leave(255, "the keeper server went away");
            }
        }
        if (dlen && p[2].revents) {
            n = write(1, down, dlen);
            if (n > 0) memmove(down, down + n, dlen -= (size_t)n);
            else if (n < 0 && errno != EINTR && errno != EAGAIN) leave(DETACHED, NULL);
        }
    }
}

/* ---- main ---------------------------------------------------------------- */

static int connect_to(const char *sock)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, sock);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return fd;
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

#define USAGE "usage: capsule-keeper [-r | -d] [-t PORT] [-b BYTES] [-o OFFSET] SOCKET -- COMMAND [ARG...]"

/* The usage line: on stdout and exit 0 when asked for (-h), else on stderr. */
_Noreturn static void usage(int code)
{
    fputs(USAGE "\n", code ? stderr : stdout);
    exit(code);
}

/* The value of option -opt: digits only (no sign, space or suffix), at most max. */
static u64 number(int opt, const char *s, u64 min, u64 max)
{
    char *end;
    const char *c = s;
    while (*c >= '0' && *c <= '9') c++;
    errno = 0;
    u64 v = strtoull(s, &end, 10);
    if (!*s || *c || *end || errno == ERANGE || v < min || v > max) {
        fprintf(stderr, "capsule-keeper: -%c takes a whole number from %llu to %llu, not '%s'\n",
                opt, min, max, s);
        usage(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    u64 bytes = 1 << 20, offset = 0;
    u64 port = 0;
    int relaying = 0, starting = 0, opt;
    opterr = 0;  /* its messages are ours */
    /* '+': options end at SOCKET, so that COMMAND's own are left alone */
    while ((opt = getopt(argc, argv, "+:rdb:o:t:h")) != -1) {
        switch (opt) {
        case 'r': relaying = 1; break;
        case 'd': starting = 1; break;
        case 't': port = number(opt, optarg, 1, 65535); break;
        case 'b': bytes = number(opt, optarg, 1, 1ULL << 32); break;
        case 'o': offset = number(opt, optarg, 0, ~0ULL); break;
        case 'h': usage(0);
        case ':':
            fprintf(stderr, "capsule-keeper: -%c needs a value\n", optopt);
            usage(2);
        default:
            fprintf(stderr, "capsule-keeper: unknown option -%c\n", optopt);
            usage(2);
        }
    }
    if (argc - optind < 1) {
        fputs("capsule-keeper: no SOCKET\n", stderr);
        usage(2);
    }
    if (argc - optind < 2 || strcmp(argv[optind + 1], "--")) {
        fputs("capsule-keeper: SOCKET must be followed by -- and COMMAND\n", stderr);
        usage(2);
    }
    if (argc - optind < 3) {
        fputs("capsule-keeper: no COMMAND after --\n", stderr);
        usage(2);
    }
    const char *sock = argv[optind];
    char **cmd = argv + optind + 2;
    if (!*sock || strlen(sock) >= sizeof ((struct sockaddr_un *)0)->sun_path) {
        fprintf(stderr, "capsule-keeper: SOCKET must be a path of 1 to %zu bytes: '%s'\n",
                sizeof ((struct sockaddr_un *)0)->sun_path - 1, sock);
        usage(2);
    }

    if (port) {
        /* The secret: an 's' frame, first on stdin; no process of the
         * session (the same user) may read it from this one's memory. */
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        unsigned char s[5 + SECRET];
        size_t got = 0;
        while (got < sizeof s) {
            ssize_t n = read(0, s + got, sizeof s - got);
            if (n > 0) got += (size_t)n;
            else if (n < 0 && errno == EINTR) continue;
            else leave(255, "-t: stdin ended before the secret");
        }
        if (s[0] != 's' || get_be(s + 1, 4) != SECRET)
            leave(255, "-t: stdin must start with the secret ('s' frame of %d bytes)", SECRET);
        memcpy(secret, s + 5, SECRET);
    }
    struct stat sb;
    if (starting && stat(sock, &sb) == 0 && S_ISSOCK(sb.st_mode))
        return 0;  /* running (connecting would replace its attachment) */
    int fd = starting ? -1 : connect_to(sock);
    if (starting) errno = ENOENT;
    if (fd < 0 && (errno == ENOENT || errno == ECONNREFUSED)) {
        char path[4096];
        make_dirs(sock);  /* SOCKET's directory, if missing */
        snprintf(path, sizeof path, "%s.lock", sock);
        int lk = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (lk < 0) leave(255, "%s: %s", path, strerror(errno));
        while (flock(lk, LOCK_EX) < 0 && errno == EINTR) {}
        /* another one may have started it meanwhile */
        int running = starting ? stat(sock, &sb) == 0 && S_ISSOCK(sb.st_mode) : 0;
        fd = starting ? -1 : connect_to(sock);
        if (!running && fd < 0 && (starting || errno == ENOENT || errno == ECONNREFUSED)) {
            if (start_server(sock, lk, bytes, cmd, port) < 0)
                leave(255, "cannot start a keeper on %s: %s", sock, strerror(errno));
            fd = starting ? -1 : connect_to(sock);
        }
        close(lk);
        if (starting) return 0;
    }
    if (fd < 0) leave(255, "cannot reach the keeper on %s: %s", sock, strerror(errno));
    if (relaying) relay(fd, offset);
    attach(fd, offset);
}

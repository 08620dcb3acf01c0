/* HTTP/1.1 responder: GET|HEAD / and /health, 404 otherwise; keep-alive,
 * pipelining (sequentially), 400 on malformed input, 431 on >4 KiB headers. */
#include "tcp.h"

#define MAX_HEADER 4096
#define RESP_ROOM 1024          /* worst-case response size */

static int lower(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

static int ieq(const u8 *a, u32 n, const char *b)
{
    u32 m = (u32)strlen(b);
    if (n != m) return 0;
    for (u32 i = 0; i < n; i++) if (lower(a[i]) != lower(b[i])) return 0;
    return 1;
}

/* does the comma-separated header value contain token t? */
static int has_token(const u8 *v, u32 n, const char *t)
{
    u32 i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
        u32 s = i;
        while (i < n && v[i] != ',') i++;
        u32 e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (ieq(v + s, e - s, t)) return 1;
    }
    return 0;
}

static int tchar(u8 c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return 1;
    for (const char *p = "!#$%&'*+-.^_`|~"; *p; p++) if (c == (u8)*p) return 1;
    return 0;
}

static void respond(struct tcb *c, int status, const char *reason, const char *ctype,
                    const char *body, u32 blen, int head_only, int keep, const char *extra)
{
    char hdr[RESP_ROOM];
    int n = ksnprintf(hdr, sizeof(hdr),
                      "HTTP/1.1 %d %s\r\nServer: jitlaunch-hello\r\nContent-Type: %s\r\n"
                      "Content-Length: %u\r\n%sConnection: %s\r\n\r\n",
                      status, reason, ctype, blen, extra ? extra : "", keep ? "keep-alive" : "close");
    tcp_write(c, hdr, (u32)n);
    if (!head_only && blen) tcp_write(c, body, blen);
    if (!keep) tcp_close(c);
}

static void error_close(struct tcb *c, int status, const char *reason)
{
    char body[64];
    int n = ksnprintf(body, sizeof(body), "%d %s\n", status, reason);
    respond(c, status, reason, "text/plain", body, (u32)n, 0, 0, NULL);
}

/* Validate a request line "METHOD SP TARGET SP HTTP/1.x". Returns the minor
 * version (0/1) or -1. Outputs method and target spans. */
static int parse_request_line(const u8 *l, u32 n, u32 *mlen, u32 *ts, u32 *tl)
{
    u32 i = 0;
    while (i < n && tchar(l[i])) i++;
    if (i == 0 || i > 16 || i >= n || l[i] != ' ') return -1;
    *mlen = i;
    u32 s = ++i;
    while (i < n && l[i] > ' ' && l[i] < 0x7f) i++;
    if (i == s || i >= n || l[i] != ' ') return -1;
    *ts = s; *tl = i - s;
    i++;
    if (n - i != 8 || memcmp(l + i, "HTTP/1.", 7)) return -1;
    if (l[i + 7] == '0') return 0;
    if (l[i + 7] == '1') return 1;
    return -1;
}

static u32 find_eoh(const u8 *b, u32 n)
{
    for (u32 i = 0; i + 1 < n; i++) {
        if (b[i] != '\n') continue;
        if (b[i + 1] == '\n') return i + 2;
        if (b[i + 1] == '\r' && i + 2 < n && b[i + 2] == '\n') return i + 3;
    }
    return 0;
}

int http_on_data(struct tcb *c)
{
    for (;;) {
        if (c->fin_pending) { c->rxlen = 0; return 0; }
        if (c->discard) {
            u32 n = c->discard < c->rxlen ? c->discard : c->rxlen;
            tcp_consume(c, n);
            c->discard -= n;
            if (c->discard) return 1;
        }
        /* tolerate empty lines before a request (RFC 9112 2.2) */
        u32 skip = 0;
        while (skip < c->rxlen && (c->rx[skip] == '\r' || c->rx[skip] == '\n')) skip++;
        if (skip) tcp_consume(c, skip);
        if (!c->rxlen) return 1;
        if (tcp_tx_space(c) < RESP_ROOM + 512) return 0;   /* wait for ACKs */

        u8 *b = c->rx;
        u32 n = c->rxlen;
        /* request line */
        u32 le = 0;
        while (le < n && b[le] != '\n') le++;
        if (le == n) {
            if (n >= MAX_HEADER) { error_close(c, 431, "Request Header Fields Too Large"); return 0; }
            /* reject obvious garbage early */
            for (u32 i = 0; i < n; i++)
                if (b[i] < 0x20 && b[i] != '\r') { error_close(c, 400, "Bad Request"); return 0; }
            return 1;
        }
        u32 ll = le;
        if (ll && b[ll - 1] == '\r') ll--;
        u32 mlen, ts, tl;
        int minor = parse_request_line(b, ll, &mlen, &ts, &tl);
        if (minor < 0) { error_close(c, 400, "Bad Request"); return 0; }
        u32 eoh = find_eoh(b, n);
        if (!eoh) {
            if (n >= MAX_HEADER) { error_close(c, 431, "Request Header Fields Too Large"); return 0; }
            return 1;
        }
        if (eoh > MAX_HEADER) { error_close(c, 431, "Request Header Fields Too Large"); return 0; }

        int keep = minor == 1;
        u32 clen = 0;
        int bad = 0, chunked = 0, have_clen = 0;
        u32 i = le + 1;
        while (i < eoh) {
            u32 e = i;
            while (e < eoh && b[e] != '\n') e++;
            u32 end = e;
            if (end > i && b[end - 1] == '\r') end--;
            if (end == i) break;                     /* blank line */
            u32 colon = i;
            while (colon < end && tchar(b[colon])) colon++;
            if (colon == i || colon >= end || b[colon] != ':') { bad = 1; break; }
            u32 vs = colon + 1;
            while (vs < end && (b[vs] == ' ' || b[vs] == '\t')) vs++;
            u32 ve = end;
            while (ve > vs && (b[ve - 1] == ' ' || b[ve - 1] == '\t')) ve--;
            for (u32 k = vs; k < ve; k++) if (b[k] < 0x20 && b[k] != '\t') bad = 1;
            const u8 *name = b + i;
            u32 nl = colon - i;
            if (ieq(name, nl, "connection")) {
                if (has_token(b + vs, ve - vs, "close")) keep = 0;
                else if (has_token(b + vs, ve - vs, "keep-alive")) keep = 1;
            } else if (ieq(name, nl, "content-length")) {
                u32 v;
                if (parse_uint((const char *)b + vs, (int)(ve - vs), &v) || (have_clen && v != clen)) bad = 1;
                else { clen = v; have_clen = 1; }
            } else if (ieq(name, nl, "transfer-encoding")) {
                chunked = 1;
            }
            i = e + 1;
        }
        if (bad) { error_close(c, 400, "Bad Request"); return 0; }
        if (chunked) { error_close(c, 501, "Not Implemented"); return 0; }

        const u8 *m = b;
        const u8 *t = b + ts;
        u32 plen = 0;
        while (plen < tl && t[plen] != '?' && t[plen] != '#') plen++;
        int head = mlen == 4 && !memcmp(m, "HEAD", 4);
        int get = mlen == 3 && !memcmp(m, "GET", 3);
        char page[512];
        tcp_consume(c, eoh);
        c->discard = clen;
        if (!get && !head) {
            const char *msg = "405 Method Not Allowed\n";
            respond(c, 405, "Method Not Allowed", "text/plain", msg, (u32)strlen(msg), 0, keep,
                    "Allow: GET, HEAD\r\n");
        } else if (plen == 1 && t[0] == '/') {
            int pl = ksnprintf(page, sizeof(page),
                               "<!DOCTYPE html>\n<html><head><title>%s</title></head>\n"
                               "<body><h1>%s</h1><p>Served by the jitlaunch hello unikernel, "
                               "instance <b>%s</b>.</p></body></html>\n",
                               cfg.name, cfg.name, cfg.name);
            respond(c, 200, "OK", "text/html; charset=utf-8", page, (u32)pl, head, keep, NULL);
        } else if (plen == 7 && !memcmp(t, "/health", 7)) {
            respond(c, 200, "OK", "text/plain", "ok\n", 3, head, keep, NULL);
        } else {
            const char *msg = "404 Not Found\n";
            respond(c, 404, "Not Found", "text/plain", msg, (u32)strlen(msg), head, keep, NULL);
        }
    }
}

/* HTTP/1.1 responder: GET|HEAD / and /health, 404 otherwise; keep-alive,
 * pipelining (sequentially), 400 on malformed input, 431 on >4 KiB headers.
 * Written for few instructions per request (string instructions, no
 * printf): under kvm_pvm the guest is instruction-emulated. */
#include "tcp.h"

#define MAX_HEADER 4096
#define RESP_ROOM 1024          /* worst-case response size */

struct sb { char *p; u32 n; };

static void sb_put(struct sb *b, const char *s, u32 n) { memcpy(b->p + b->n, s, n); b->n += n; }
#define SB_LIT(b, lit) sb_put((b), (lit), sizeof(lit) - 1)

static void sb_num(struct sb *b, u32 v)
{
    char t[10];
    int n = 0;
    do { t[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) b->p[b->n++] = t[--n];
}

static int lower(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

static int ieq(const u8 *a, u32 n, const char *b, u32 m)
{
    if (n != m) return 0;
    for (u32 i = 0; i < n; i++) if (lower(a[i]) != b[i]) return 0;
    return 1;
}

/* does the comma-separated header value contain token t (lowercase)? */
static int has_token(const u8 *v, u32 n, const char *t, u32 tl)
{
    u32 i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
        u32 s = i;
        i += find_byte(v + i, n - i, ',');
        u32 e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (ieq(v + s, e - s, t, tl)) return 1;
    }
    return 0;
}

static char page[512];
static u32 page_len;

static void build_page(void)
{
    struct sb b = { page, 0 };
    u32 nl = (u32)strlen(cfg.name);
    SB_LIT(&b, "<!DOCTYPE html>\n<html><head><title>");
    sb_put(&b, cfg.name, nl);
    SB_LIT(&b, "</title></head>\n<body><h1>");
    sb_put(&b, cfg.name, nl);
    SB_LIT(&b, "</h1><p>Served by the jitlaunch hello unikernel, instance <b>");
    sb_put(&b, cfg.name, nl);
    SB_LIT(&b, "</b>.</p></body></html>\n");
    page_len = b.n;
}

static void respond(struct tcb *c, const char *status, u32 slen, const char *ctype, u32 clen_,
                    const char *body, u32 blen, int head_only, int keep, int allow)
{
    char hdr[RESP_ROOM];
    struct sb b = { hdr, 0 };
    SB_LIT(&b, "HTTP/1.1 ");
    sb_put(&b, status, slen);
    SB_LIT(&b, "\r\nServer: jitlaunch-hello\r\nContent-Type: ");
    sb_put(&b, ctype, clen_);
    SB_LIT(&b, "\r\nContent-Length: ");
    sb_num(&b, blen);
    if (allow) SB_LIT(&b, "\r\nAllow: GET, HEAD");
    if (keep) SB_LIT(&b, "\r\nConnection: keep-alive\r\n\r\n");
    else SB_LIT(&b, "\r\nConnection: close\r\n\r\n");
    if (!head_only) sb_put(&b, body, blen);
    tcp_write(c, hdr, b.n);
    if (!keep) tcp_close(c);
}

#define S(x) x, sizeof(x) - 1
#define TEXT S("text/plain")

static void error_close(struct tcb *c, int code)
{
    if (code == 400) respond(c, S("400 Bad Request"), TEXT, S("400 Bad Request\n"), 0, 0, 0);
    else if (code == 431) respond(c, S("431 Request Header Fields Too Large"), TEXT,
                                  S("431 Request Header Fields Too Large\n"), 0, 0, 0);
    else respond(c, S("501 Not Implemented"), TEXT, S("501 Not Implemented\n"), 0, 0, 0);
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
        /* method: 1-16 upper-case letters then a space; reject garbage early */
        u32 mlen = 0;
        while (mlen < n && mlen <= 16 && b[mlen] >= 'A' && b[mlen] <= 'Z') mlen++;
        if (mlen < n && (mlen == 0 || mlen > 16 || b[mlen] != ' ')) { error_close(c, 400); return 0; }

        u32 le = find_byte(b, n, '\n');
        if (le == n) {
            if (n >= MAX_HEADER) { error_close(c, 431); return 0; }
            return 1;
        }
        /* request line: METHOD SP TARGET SP HTTP/1.x */
        u32 ll = le;
        if (ll && b[ll - 1] == '\r') ll--;
        u32 ts = mlen + 1;
        u32 tl = find_byte(b + ts, ll - ts, ' ');
        u32 vs = ts + tl + 1;
        if (tl == 0 || vs > ll || ll - vs != 8 || memcmp(b + vs, "HTTP/1.", 7) ||
            (b[vs + 7] != '0' && b[vs + 7] != '1')) {
            error_close(c, 400);
            return 0;
        }
        for (u32 i = ts; i < ts + tl; i++)
            if (b[i] <= ' ' || b[i] >= 0x7f) { error_close(c, 400); return 0; }
        int keep = b[vs + 7] == '1';

        /* header lines up to the empty line */
        u32 clen = 0, eoh = 0;
        int bad = 0, chunked = 0, have_clen = 0;
        u32 i = le + 1;
        while (i < n) {
            u32 e = i + find_byte(b + i, n - i, '\n');
            if (e == n) break;                       /* incomplete */
            u32 end = e;
            if (end > i && b[end - 1] == '\r') end--;
            if (end == i) { eoh = e + 1; break; }    /* blank line */
            u32 colon = i + find_byte(b + i, end - i, ':');
            if (colon == i || colon >= end || b[colon - 1] == ' ' || b[colon - 1] == '\t') bad = 1;
            else {
                u32 vstart = colon + 1;
                while (vstart < end && (b[vstart] == ' ' || b[vstart] == '\t')) vstart++;
                u32 vend = end;
                while (vend > vstart && (b[vend - 1] == ' ' || b[vend - 1] == '\t')) vend--;
                const u8 *name = b + i;
                u32 nl = colon - i;
                if (ieq(name, nl, "connection", 10)) {
                    if (has_token(b + vstart, vend - vstart, "close", 5)) keep = 0;
                    else if (has_token(b + vstart, vend - vstart, "keep-alive", 10)) keep = 1;
                } else if (ieq(name, nl, "content-length", 14)) {
                    u32 v;
                    if (parse_uint((const char *)b + vstart, (int)(vend - vstart), &v) ||
                        (have_clen && v != clen)) bad = 1;
                    else { clen = v; have_clen = 1; }
                } else if (ieq(name, nl, "transfer-encoding", 17)) {
                    chunked = 1;
                }
            }
            i = e + 1;
        }
        if (!eoh) {
            if (n >= MAX_HEADER) { error_close(c, 431); return 0; }
            return 1;
        }
        if (eoh > MAX_HEADER) { error_close(c, 431); return 0; }
        if (bad) { error_close(c, 400); return 0; }
        if (chunked) { error_close(c, 501); return 0; }

        const u8 *t = b + ts;
        u32 plen = 0;
        while (plen < tl && t[plen] != '?' && t[plen] != '#') plen++;
        int head = mlen == 4 && !memcmp(b, "HEAD", 4);
        int get = mlen == 3 && !memcmp(b, "GET", 3);
        int root = plen == 1 && t[0] == '/';
        int health = plen == 7 && !memcmp(t, "/health", 7);
        tcp_consume(c, eoh);
        c->discard = clen;
        if (!get && !head) {
            respond(c, S("405 Method Not Allowed"), TEXT, S("405 Method Not Allowed\n"), 0, keep, 1);
        } else if (root) {
            if (!page_len) build_page();
            respond(c, S("200 OK"), S("text/html; charset=utf-8"), page, page_len, head, keep, 0);
        } else if (health) {
            respond(c, S("200 OK"), TEXT, S("ok\n"), head, keep, 0);
        } else {
            respond(c, S("404 Not Found"), TEXT, S("404 Not Found\n"), head, keep, 0);
        }
    }
}

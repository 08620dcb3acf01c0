/* A small TCP server: passive open only, many connections, no options but MSS.
 * Retransmission is go-back-N from snd_una on a per-connection timer with
 * exponential backoff; out-of-order segments are dropped (and dup-ACKed). */
#include "tcp.h"

#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_PSH 0x08
#define F_ACK 0x10

#define RTO_INIT (HZ / 4)          /* 250 ms */
#define RTO_MAX (8 * HZ)
#define MAX_REXMIT 10
#define IDLE_TIMEOUT (30 * HZ)     /* keep-alive / half-open request timeout */
#define FIN_WAIT2_TIMEOUT (10 * HZ)
#define TIME_WAIT_TIME (1 * HZ)

static struct tcb conns[TCP_SLOTS];
static struct tcb *active[TCP_SLOTS];   /* connections not CLOSED */
static u32 nactive;
static struct tcb *hash[64];
static u16 freelist[TCP_SLOTS];
static u32 nfree, nfresh;               /* freed slots; slots never used */
static u32 iss_counter;

static inline u32 hslot(u32 ip, u16 port) { return (ip ^ (ip >> 12) ^ port ^ (port >> 6)) & 63; }

void ip_discard(u8 *payload);

static inline int seq_lt(u32 a, u32 b) { return (i32)(a - b) < 0; }
static inline int seq_le(u32 a, u32 b) { return (i32)(a - b) <= 0; }
static inline u16 get16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }
static inline u32 get32(const u8 *p) { return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3]; }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v) { p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }

void tcp_init(void)
{
    iss_counter = (u32)rdtsc();
}

int tcp_active(void) { return nactive != 0; }

static u32 rcv_wnd(struct tcb *c)
{
    return c->rx_closed ? TCP_RXBUF : TCP_RXBUF - c->rxlen;
}

/* raw segment output; seq/ack/flags given, payload optional */
static void tcp_xmit(u32 rip, u16 lport, u16 rport, u32 seq, u32 ack, u8 flags, u16 wnd,
                     const u8 *data, u32 len, u16 mss_opt)
{
    u8 *t = ip_alloc(NULL);
    if (!t) return;
    u32 hl = mss_opt ? 24 : 20;
    put16(t, lport); put16(t + 2, rport);
    put32(t + 4, seq); put32(t + 8, ack);
    t[12] = (u8)((hl / 4) << 4); t[13] = flags;
    put16(t + 14, wnd); put16(t + 16, 0); put16(t + 18, 0);
    if (mss_opt) { t[20] = 2; t[21] = 4; put16(t + 22, mss_opt); }
    if (len) memcpy(t + hl, data, len);
    put16(t + 16, csum_fold(csum_add(t, hl + len, ip_pseudo(cfg.ip, rip, 6, hl + len))));
    ip_finish(t, rip, 6, hl + len);
}

static void send_seg(struct tcb *c, u32 seq, u8 flags, const u8 *data, u32 len)
{
    u32 w = rcv_wnd(c);
    if (w > 65535) w = 65535;
    c->adv_wnd = w;
    tcp_xmit(c->rip, cfg.port, c->rport, seq, c->rcv_nxt, flags, (u16)w, data, len,
             (flags & F_SYN) ? 1460 : 0);
    c->ack_now = 0;
}

static void send_synack(struct tcb *c) { send_seg(c, c->iss, F_SYN | F_ACK, NULL, 0); }

static void tcb_free(struct tcb *c)
{
    struct tcb **pp = &hash[hslot(c->rip, c->rport)];
    while (*pp && *pp != c) pp = &(*pp)->hnext;
    if (*pp) *pp = c->hnext;
    struct tcb *last = active[--nactive];
    active[c->aidx] = last;
    last->aidx = c->aidx;
    freelist[nfree++] = (u16)(c - conns);
    u8 *rx = c->rx, *tx = c->tx;
    memset(c, 0, sizeof(*c));
    c->rx = rx; c->tx = tx;
}

static void tcb_abort(struct tcb *c)
{
    if (c->state != SYN_RCVD && c->state != TIME_WAIT)
        tcp_xmit(c->rip, cfg.port, c->rport, c->snd_nxt, 0, F_RST, 0, NULL, 0, 0);
    tcb_free(c);
}

/* Reply to a segment that belongs to no connection (RFC 793 reset generation). */
static void send_rst_for(u32 src, u16 sport, u16 dport, u32 seq, u32 ack, u8 flags, u32 dlen)
{
    if (flags & F_RST) return;
    if (flags & F_ACK)
        tcp_xmit(src, dport, sport, ack, 0, F_RST, 0, NULL, 0, 0);
    else
        tcp_xmit(src, dport, sport, 0, seq + dlen + !!(flags & F_SYN) + !!(flags & F_FIN),
                 F_RST | F_ACK, 0, NULL, 0, 0);
}

static void arm_rt(struct tcb *c)
{
    if (!c->rt_deadline) c->rt_deadline = jiffies + c->rto;
}

/* Send whatever the window allows, then the FIN if the application closed. */
static void tcp_output(struct tcb *c)
{
    int sent = 0;
    if (c->state >= ESTABLISHED) {
        for (;;) {
            u32 inflight = c->snd_nxt - c->snd_una;
            u32 unsent = c->txlen > inflight ? c->txlen - inflight : 0;
            if (!unsent || c->fin_sent) break;
            u32 room = c->snd_wnd > inflight ? c->snd_wnd - inflight : 0;
            if (!room) break;
            u32 n = unsent;
            if (n > room) n = room;
            if (n > c->mss) n = c->mss;
            send_seg(c, c->snd_nxt, F_ACK | (n == unsent ? F_PSH : 0), c->tx + inflight, n);
            c->snd_nxt += n;
            if (seq_lt(c->snd_max, c->snd_nxt)) c->snd_max = c->snd_nxt;
            sent = 1;
        }
        u32 inflight = c->snd_nxt - c->snd_una;
        if (c->fin_pending && !c->fin_sent && inflight >= c->txlen &&
            (c->state == ESTABLISHED || c->state == CLOSE_WAIT || c->state == FIN_WAIT_1 ||
             c->state == LAST_ACK || c->state == CLOSING)) {
            send_seg(c, c->snd_nxt, F_FIN | F_ACK, NULL, 0);
            c->fin_seq = c->snd_nxt;
            c->fin_once = 1;
            c->snd_nxt++;
            if (seq_lt(c->snd_max, c->snd_nxt)) c->snd_max = c->snd_nxt;
            c->fin_sent = 1;
            sent = 1;
            if (c->state == ESTABLISHED) c->state = FIN_WAIT_1;
            else if (c->state == CLOSE_WAIT) c->state = LAST_ACK;
        }
        if (c->snd_nxt != c->snd_una) arm_rt(c);
        else if (c->txlen && !c->snd_wnd) arm_rt(c);   /* persist */
    }
    if (!sent) {
        u32 w = rcv_wnd(c);
        /* window update once the application drained the buffer */
        if (c->state >= ESTABLISHED && c->adv_wnd < c->mss && w >= c->adv_wnd + c->mss)
            c->ack_now = 1;
        if (c->ack_now) send_seg(c, c->snd_nxt, F_ACK, NULL, 0);
    }
}

u32 tcp_tx_space(struct tcb *c) { return TCP_TXBUF - c->txlen; }

u32 tcp_write(struct tcb *c, const void *data, u32 len)
{
    if (c->fin_pending || (c->state != ESTABLISHED && c->state != CLOSE_WAIT)) return 0;
    u32 n = tcp_tx_space(c);
    if (n > len) n = len;
    memcpy(c->tx + c->txlen, data, n);
    c->txlen += n;
    return n;
}

void tcp_consume(struct tcb *c, u32 n)
{
    if (n >= c->rxlen) { c->rxlen = 0; return; }
    memmove(c->rx, c->rx + n, c->rxlen - n);
    c->rxlen -= n;
}

void tcp_close(struct tcb *c)
{
    c->fin_pending = 1;
    c->rx_closed = 1;
    c->rxlen = 0;
}

static struct tcb *lookup(u32 rip, u16 rport)
{
    for (struct tcb *c = hash[hslot(rip, rport)]; c; c = c->hnext)
        if (c->rip == rip && c->rport == rport) return c;
    return NULL;
}

/* A free slot, or a recycled one when all are in use. The caller fills in
 * rip/rport and calls tcb_link(). */
static struct tcb *alloc_tcb(void)
{
    struct tcb *c = NULL;
    if (nfree) c = &conns[freelist[--nfree]];
    else if (nfresh < TCP_SLOTS) c = &conns[nfresh++];
    else {
        /* full: reuse the oldest TIME_WAIT slot, else drop the oldest stale
         * half-open (SYN_RCVD) one, so a SYN flood cannot lock out clients */
        struct tcb *tw = NULL, *syn = NULL;
        for (u32 i = 0; i < nactive; i++) {
            struct tcb *a = active[i];
            if (a->state == TIME_WAIT && (!tw || a->idle_deadline < tw->idle_deadline)) tw = a;
            /* half-open for 750 ms or more (two SYN-ACK retransmissions):
             * a real client in its handshake would have answered by now */
            if (a->state == SYN_RCVD && a->rexmits >= 2 &&
                (!syn || a->idle_deadline < syn->idle_deadline))
                syn = a;
        }
        if (!tw) tw = syn;
        if (!tw) return NULL;
        tcb_free(tw);
        c = &conns[freelist[--nfree]];
    }
    if (!c->rx) {
        u8 *b = heap_alloc(TCP_RXBUF + TCP_TXBUF, 64);
        if (!b) {                   /* out of RAM: give the slot back, drop the SYN */
            freelist[nfree++] = (u16)(c - conns);
            return NULL;
        }
        c->rx = b;
        c->tx = b + TCP_RXBUF;
    }
    return c;
}

static void tcb_link(struct tcb *c)
{
    u32 h = hslot(c->rip, c->rport);
    c->hnext = hash[h];
    hash[h] = c;
    c->aidx = (u16)nactive;
    active[nactive++] = c;
}

static void passive_open(u32 src, u16 sport, u32 seq, u16 wnd, const u8 *opt, u32 optlen)
{
    struct tcb *c = alloc_tcb();
    if (!c) return;     /* full: the client will retransmit its SYN */
    u16 mss = 536;
    for (u32 i = 0; i < optlen;) {
        u8 kind = opt[i];
        if (kind == 0) break;
        if (kind == 1) { i++; continue; }
        if (i + 1 >= optlen || opt[i + 1] < 2 || i + opt[i + 1] > optlen) break;
        if (kind == 2 && opt[i + 1] == 4) mss = get16(opt + i + 2);
        i += opt[i + 1];
    }
    if (mss > 1460) mss = 1460;
    if (mss < 64) mss = 64;
    c->state = SYN_RCVD;
    c->rip = src;
    c->rport = sport;
    tcb_link(c);
    c->mss = mss;
    c->irs = seq;
    c->rcv_nxt = seq + 1;
    iss_counter += 64000 + ((u32)rdtsc() & 0xffff);
    c->iss = iss_counter ^ (src * 2654435761u) ^ ((u32)sport << 16);
    c->snd_una = c->iss;
    c->snd_nxt = c->iss + 1;
    c->snd_max = c->snd_nxt;
    c->snd_wnd = wnd;
    c->rto = RTO_INIT;
    c->idle_deadline = jiffies + IDLE_TIMEOUT;
    send_synack(c);
    arm_rt(c);
}

void tcp_rx(u32 src, u32 dst, u8 *seg, u32 len)
{
    if (len < 20) return;
    u32 doff = (u32)(seg[12] >> 4) * 4;
    if (doff < 20 || doff > len) return;
    if (csum_fold(csum_add(seg, len, ip_pseudo(src, dst, 6, len))) != 0) return;
    u16 sport = get16(seg), dport = get16(seg + 2);
    u32 seq = get32(seg + 4), ack = get32(seg + 8);
    u8 flags = seg[13];
    u16 wnd = get16(seg + 14);
    u8 *data = seg + doff;
    u32 dlen = len - doff;
    if (sport == 0) return;

    if (dport != cfg.port) { send_rst_for(src, sport, dport, seq, ack, flags, dlen); return; }
    struct tcb *c = lookup(src, sport);
    if (c && c->state == TIME_WAIT && (flags & F_SYN) && !(flags & F_ACK) && seq_lt(c->rcv_nxt, seq)) {
        tcb_free(c);    /* new incarnation of the same 4-tuple */
        c = NULL;
    }
    if (!c) {
        if (flags & F_RST) return;
        if (flags & F_ACK) { send_rst_for(src, sport, dport, seq, ack, flags, dlen); return; }
        if (!(flags & F_SYN)) return;
        passive_open(src, sport, seq, wnd, seg + 20, doff - 20);
        return;
    }
    if (c->state == SYN_RCVD && (flags & F_SYN) && !(flags & F_ACK) && !(flags & F_RST)) {
        if (seq == c->irs) send_synack(c);          /* retransmitted SYN */
        return;
    }

    /* acceptability (RFC 793, 3.9) */
    u32 seglen = dlen + !!(flags & F_SYN) + !!(flags & F_FIN);
    u32 w = rcv_wnd(c);
    int ok;
    if (seglen == 0)
        ok = w == 0 ? seq == c->rcv_nxt : (seq_le(c->rcv_nxt, seq) && seq_lt(seq, c->rcv_nxt + w));
    else
        ok = w != 0 && ((seq_le(c->rcv_nxt, seq) && seq_lt(seq, c->rcv_nxt + w)) ||
                        (seq_le(c->rcv_nxt, seq + seglen - 1) && seq_lt(seq + seglen - 1, c->rcv_nxt + w)));
    if (!ok && w == 0 && seq == c->rcv_nxt) ok = 1;    /* zero-window probe: process ACK, drop data */
    if (!ok) {
        if (!(flags & F_RST)) { c->ack_now = 1; tcp_output(c); }
        return;
    }
    if (flags & F_RST) {
        if (seq == c->rcv_nxt) tcb_free(c);
        else { c->ack_now = 1; tcp_output(c); }     /* challenge ACK (RFC 5961) */
        return;
    }
    if (flags & F_SYN) { c->ack_now = 1; tcp_output(c); return; }
    if (!(flags & F_ACK)) return;

    if (c->state != TIME_WAIT) c->idle_deadline = jiffies + IDLE_TIMEOUT;
    if (c->state == SYN_RCVD) {
        if (ack != c->iss + 1) { send_rst_for(src, sport, dport, seq, ack, flags, dlen); return; }
        c->state = ESTABLISHED;
        c->snd_una = ack;
        c->snd_wnd = wnd;
        c->snd_wl1 = seq;
        c->snd_wl2 = ack;
        c->rt_deadline = 0;
        c->rexmits = 0;
    } else {
        if (seq_lt(c->snd_max, ack)) { c->ack_now = 1; tcp_output(c); return; }
        if (seq_lt(c->snd_una, ack)) {
            u32 acked = ack - c->snd_una;
            u32 d = acked < c->txlen ? acked : c->txlen;
            if (d) {
                memmove(c->tx, c->tx + d, c->txlen - d);
                c->txlen -= d;
            }
            c->snd_una = ack;
            if (seq_lt(c->snd_nxt, ack)) c->snd_nxt = ack;   /* acked past a go-back-N rewind */
            if (c->fin_once && ack == c->fin_seq + 1) c->fin_sent = 1;
            c->rexmits = 0;
            c->rto = RTO_INIT;
            c->rt_deadline = 0;
            if (c->snd_una != c->snd_nxt) arm_rt(c);
            if (c->fin_once && ack == c->fin_seq + 1) {
                if (c->state == FIN_WAIT_1) { c->state = FIN_WAIT_2; c->idle_deadline = jiffies + FIN_WAIT2_TIMEOUT; }
                else if (c->state == CLOSING) { c->state = TIME_WAIT; c->idle_deadline = jiffies + TIME_WAIT_TIME; }
                else if (c->state == LAST_ACK) { tcb_free(c); return; }
            }
        }
        if (seq_lt(c->snd_wl1, seq) || (c->snd_wl1 == seq && seq_le(c->snd_wl2, ack))) {
            c->snd_wnd = wnd;
            c->snd_wl1 = seq;
            c->snd_wl2 = ack;
        }
    }

    /* segment text */
    int fin = (flags & F_FIN) != 0;
    if (dlen || fin) {
        if (seq_lt(seq, c->rcv_nxt)) {
            u32 skip = c->rcv_nxt - seq;
            if (skip > dlen) { skip = dlen; fin = 0; }   /* only old data (and FIN) */
            data += skip; dlen -= skip; seq += skip;
        }
        if (seq != c->rcv_nxt) {
            c->ack_now = 1;             /* out of order: drop, dup-ACK */
            dlen = 0; fin = 0;
        }
    }
    if (dlen) {
        c->ack_now = 1;
        if (c->state == ESTABLISHED || c->state == FIN_WAIT_1 || c->state == FIN_WAIT_2) {
            u32 take = dlen;
            if (take > w) { take = w; fin = 0; }
            if (!c->rx_closed) memcpy(c->rx + c->rxlen, data, take);
            if (!c->rx_closed) c->rxlen += take;
            c->rcv_nxt += take;
        } else {
            fin = 0;                    /* data after the peer's FIN is ignored */
        }
    }
    if (fin && c->state != CLOSE_WAIT && c->state != LAST_ACK && c->state != CLOSING &&
        c->state != TIME_WAIT) {
        c->rcv_nxt++;
        c->ack_now = 1;
        if (c->state == ESTABLISHED) c->state = CLOSE_WAIT;
        else if (c->state == FIN_WAIT_1) c->state = CLOSING;
        else if (c->state == FIN_WAIT_2) { c->state = TIME_WAIT; c->idle_deadline = jiffies + TIME_WAIT_TIME; }
    } else if ((flags & F_FIN) && c->state == TIME_WAIT) {
        c->ack_now = 1;
        c->idle_deadline = jiffies + TIME_WAIT_TIME;
    }

    if (c->state == ESTABLISHED || c->state == CLOSE_WAIT) {
        int need_input = (c->rxlen || c->state == CLOSE_WAIT) ? http_on_data(c) : 1;
        if (c->state == CLOSE_WAIT && !c->fin_pending && (c->rxlen == 0 || need_input)) tcp_close(c);
    }
    tcp_output(c);
}

void tcp_timer(void)
{
    static u64 last;
    u64 now = jiffies;
    if (now == last) return;
    last = now;
    /* backwards: tcb_free() moves the last entry into the freed index */
    for (u32 i = nactive; i-- > 0;) {
        if (i >= nactive) continue;
        struct tcb *c = active[i];
        if (c->rt_deadline && now >= c->rt_deadline) {
            c->rt_deadline = 0;
            if (c->rexmits >= MAX_REXMIT) { tcb_abort(c); continue; }
            c->rexmits++;
            c->rto = c->rto * 2 > RTO_MAX ? RTO_MAX : c->rto * 2;
            if (c->state == SYN_RCVD) {
                send_synack(c);
                arm_rt(c);
                continue;
            }
            if (c->snd_nxt != c->snd_una) {
                c->snd_nxt = c->snd_una;   /* go back N */
                c->fin_sent = 0;
            } else if (c->txlen && !c->snd_wnd) {
                /* zero-window probe: one byte beyond the window */
                send_seg(c, c->snd_nxt, F_ACK, c->tx, 1);
                c->snd_nxt++;
                if (seq_lt(c->snd_max, c->snd_nxt)) c->snd_max = c->snd_nxt;
                arm_rt(c);
                continue;
            }
            tcp_output(c);
            arm_rt(c);
        }
        if (c->state != CLOSED && c->idle_deadline && now >= c->idle_deadline) {
            if (c->state == TIME_WAIT) tcb_free(c);
            else if (c->state == FIN_WAIT_2 || c->fin_pending) tcb_abort(c);
            else {
                tcp_close(c);       /* idle keep-alive or stalled request */
                c->idle_deadline = now + FIN_WAIT2_TIMEOUT;
                tcp_output(c);
            }
        }
    }
}

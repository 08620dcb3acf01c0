/* Ethernet, ARP (answer, ask, small cache), IPv4, ICMP echo, UDP echo. */
#include "common.h"

#define ETH_HLEN 14
#define IP_HLEN 20
#define ARP_SLOTS 32
#define ARP_PENDING 8

struct arp_entry { u32 ip; u8 mac[6]; u8 valid; };
struct pending { u32 nh; u32 len; u8 tries; u8 used; u64 next; u8 frame[1514]; };

static struct arp_entry arp_cache[ARP_SLOTS];
static u32 arp_rr;
static struct pending pend[ARP_PENDING];
static u16 ip_id;
static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static inline u16 get16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }
static inline u32 get32(const u8 *p) { return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3]; }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v) { p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }

/* One's-complement sum, returned as a 32-bit partial sum of big-endian
 * 16-bit words. Summed 8 bytes at a time with adc in the little-endian
 * domain and byte-swapped at the end (RFC 1071: the sum is byte-order
 * independent up to a swap). */
u32 csum_add(const void *data, u32 len, u32 sum)
{
    const u8 *p = data;
    u64 acc = 0;
    u64 n32 = len >> 5;
    if (n32) {
        __asm__ volatile(
            "clc\n"
            "1: adcq (%[p]), %[a]\n"
            "adcq 8(%[p]), %[a]\n"
            "adcq 16(%[p]), %[a]\n"
            "adcq 24(%[p]), %[a]\n"
            "leaq 32(%[p]), %[p]\n"
            "decq %[n]\n"
            "jnz 1b\n"
            "adcq $0, %[a]\n"
            : [a] "+r"(acc), [p] "+r"(p), [n] "+r"(n32) : : "cc", "memory");
    }
    len &= 31;
    u64 tail = 0;
    while (len >= 8) {
        u64 w = *(const u64 *)p;
        acc += w;
        acc += acc < w;
        p += 8;
        len -= 8;
    }
    for (u32 i = 0; i < len; i++) tail |= (u64)p[i] << (8 * i);
    acc += tail;
    acc += acc < tail;
    /* fold 64 -> 16 (little-endian domain) */
    acc = (acc & 0xffffffff) + (acc >> 32);
    acc = (acc & 0xffffffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    u32 be = (u32)(((acc & 0xff) << 8) | (acc >> 8));
    u64 s2 = (u64)sum + be;
    return (u32)((s2 & 0xffffffff) + (s2 >> 32));
}

u16 csum_fold(u32 sum)
{
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

u16 csum_partial(const void *data, u32 len, u32 sum) { return csum_fold(csum_add(data, len, sum)); }

/* checksum of an option-less IPv4 header: five 32-bit words */
static u16 csum_ip20(const u8 *h)
{
    const u32 *w = (const u32 *)h;
    u64 a = (u64)w[0] + w[1] + w[2] + w[3] + w[4];
    a = (a & 0xffffffff) + (a >> 32);
    a = (a & 0xffff) + (a >> 16);
    a = (a & 0xffff) + (a >> 16);
    a = (a & 0xffff) + (a >> 16);
    return (u16)~__builtin_bswap16((u16)a);
}

static inline int mac_eq(const u8 *a, const u8 *b)
{
    return *(const u32 *)a == *(const u32 *)b && *(const u16 *)(a + 4) == *(const u16 *)(b + 4);
}

u32 ip_pseudo(u32 src, u32 dst, u8 proto, u32 len)
{
    u64 s = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + len;
    while (s >> 32) s = (s & 0xffffffff) + (s >> 32);
    return (u32)s;
}

static struct arp_entry *arp_last;
static int npending;

static struct arp_entry *arp_find(u32 ip)
{
    if (arp_last && arp_last->ip == ip) return arp_last;
    for (int i = 0; i < ARP_SLOTS; i++)
        if (arp_cache[i].valid && arp_cache[i].ip == ip) return arp_last = &arp_cache[i];
    return NULL;
}

static void arp_flush_pending(u32 ip, const u8 *mac)
{
    for (int i = 0; i < ARP_PENDING; i++) {
        struct pending *p = &pend[i];
        if (!p->used || p->nh != ip) continue;
        u8 *f = net_tx_buf();
        if (!f) return;
        memcpy(f, p->frame, p->len);
        memcpy(f, mac, 6);
        net_tx_send(f, p->len);
        p->used = 0;
        npending--;
    }
}

static void arp_update(u32 ip, const u8 *mac, int create)
{
    if (!ip || ip == 0xffffffff || (mac[0] & 1)) return;
    struct arp_entry *e = arp_find(ip);
    if (!e) {
        if (!create) return;
        e = &arp_cache[arp_rr++ % ARP_SLOTS];
    }
    e->ip = ip;
    memcpy(e->mac, mac, 6);
    e->valid = 1;
    arp_flush_pending(ip, mac);
}

static void arp_send(u16 op, const u8 *dmac, u32 tip, const u8 *tmac)
{
    u8 *f = net_tx_buf();
    if (!f) return;
    memcpy(f, dmac, 6);
    memcpy(f + 6, cfg.mac, 6);
    put16(f + 12, 0x0806);
    u8 *a = f + ETH_HLEN;
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy(a + 8, cfg.mac, 6);
    put32(a + 14, cfg.ip);
    memcpy(a + 18, tmac, 6);
    put32(a + 24, tip);
    net_tx_send(f, ETH_HLEN + 28);
}

static void arp_rx(const u8 *a, u32 len)
{
    if (len < 28 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4) return;
    u16 op = get16(a + 6);
    u32 spa = get32(a + 14), tpa = get32(a + 24);
    const u8 *sha = a + 8;
    int for_us = tpa == cfg.ip;
    arp_update(spa, sha, for_us);   /* RFC 826: merge, or insert if we are the target */
    if (op == 1 && for_us) arp_send(2, sha, spa, sha);
}

int arp_pending(void) { return npending != 0; }

/* Gratuitous ARP at link-up: peers (QEMU's slirp, a bridge's hosts) learn
 * our MAC before their first packet to us instead of parking it on ARP. */
void arp_announce(void)
{
    arp_send(1, bcast, cfg.ip, (const u8[6]){ 0 });
}

void net_timer(void)
{
    if (!npending) return;
    for (int i = 0; i < ARP_PENDING; i++) {
        struct pending *p = &pend[i];
        if (!p->used || jiffies < p->next) continue;
        if (p->tries >= 3) { p->used = 0; npending--; continue; }
        p->tries++;
        p->next = jiffies + HZ / 2;
        arp_send(1, bcast, p->nh, (const u8[6]){ 0 });
    }
}

u8 *ip_alloc(u32 *room)
{
    u8 *f = net_tx_buf();
    if (!f) return NULL;
    if (room) *room = 1500 - IP_HLEN;
    return f + ETH_HLEN + IP_HLEN;
}

void ip_discard(u8 *payload) { net_tx_drop(payload - ETH_HLEN - IP_HLEN); }

void ip_finish(u8 *payload, u32 dst, u8 proto, u32 len)
{
    u8 *f = payload - ETH_HLEN - IP_HLEN;
    u8 *ip = f + ETH_HLEN;
    ip[0] = 0x45; ip[1] = 0;
    put16(ip + 2, (u16)(IP_HLEN + len));
    put16(ip + 4, ip_id++);
    put16(ip + 6, 0x4000);              /* DF */
    ip[8] = 64; ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, cfg.ip);
    put32(ip + 16, dst);
    put16(ip + 10, csum_ip20(ip));
    memcpy(f + 6, cfg.mac, 6);
    put16(f + 12, 0x0800);
    u32 flen = ETH_HLEN + IP_HLEN + len;
    u32 nh = ((dst ^ cfg.ip) & cfg.mask) ? cfg.gw : dst;
    struct arp_entry *e = arp_find(nh);
    if (e) {
        memcpy(f, e->mac, 6);
        net_tx_send(f, flen);
        return;
    }
    /* park the frame and ask */
    struct pending *p = NULL;
    for (int i = 0; i < ARP_PENDING; i++) if (!pend[i].used) { p = &pend[i]; break; }
    if (p) {
        p->used = 1; npending++; p->nh = nh; p->len = flen; p->tries = 1; p->next = jiffies + HZ / 2;
        memcpy(p->frame, f, flen);
    }
    net_tx_drop(f);
    arp_send(1, bcast, nh, (const u8[6]){ 0 });
}

static void icmp_rx(u32 src, const u8 *m, u32 len)
{
    if (len < 8 || m[0] != 8 || m[1] != 0) return;
    if (csum_partial(m, len, 0) != 0) return;
    u32 room;
    u8 *r = ip_alloc(&room);
    if (!r) return;
    if (len > room) { ip_discard(r); return; }
    memcpy(r, m, len);
    r[0] = 0; r[1] = 0;
    put16(r + 2, 0);
    put16(r + 2, csum_partial(r, len, 0));
    ip_finish(r, src, 1, len);
}

static void icmp_unreach(u32 src, const u8 *iph, u32 iplen, u8 code)
{
    u32 room;
    u8 *r = ip_alloc(&room);
    if (!r) return;
    u32 n = iplen < 28 ? iplen : 28;
    memset(r, 0, 8);
    r[0] = 3; r[1] = code;
    memcpy(r + 8, iph, n);
    put16(r + 2, csum_partial(r, 8 + n, 0));
    ip_finish(r, src, 1, 8 + n);
}

static void udp_rx(u32 src, u32 dst, const u8 *iph, u32 iplen, const u8 *u, u32 len)
{
    if (len < 8) return;
    u32 ulen = get16(u + 4);
    if (ulen < 8 || ulen > len) return;
    if (get16(u + 6) && csum_fold(csum_add(u, ulen, ip_pseudo(src, dst, 17, ulen))) != 0) return;
    u16 sport = get16(u), dport = get16(u + 2);
    if (dport != cfg.udp_port || !cfg.udp_port) {
        icmp_unreach(src, iph, iplen, 3);
        return;
    }
    if (sport == 0) return;
    u32 room;
    u8 *r = ip_alloc(&room);
    if (!r) return;
    if (ulen > room) { ip_discard(r); return; }
    memcpy(r, u, ulen);
    put16(r, dport); put16(r + 2, sport);
    put16(r + 6, 0);
    u16 c = csum_fold(csum_add(r, ulen, ip_pseudo(cfg.ip, src, 17, ulen)));
    put16(r + 6, c ? c : 0xffff);
    ip_finish(r, src, 17, ulen);
}

static void ip_rx(const u8 *eth, u8 *ip, u32 len)
{
    if (len < IP_HLEN || (ip[0] >> 4) != 4) return;
    u32 ihl = (u32)(ip[0] & 15) * 4;
    u32 tot = get16(ip + 2);
    if (ihl < IP_HLEN || tot < ihl || tot > len) return;
    if ((ihl == IP_HLEN ? csum_ip20(ip) : csum_partial(ip, ihl, 0)) != 0) return;
    if (get16(ip + 6) & 0x3fff) return;          /* fragments are not supported */
    u32 src = get32(ip + 12), dst = get32(ip + 16);
    if (dst != cfg.ip) return;
    if (src == 0 || src == 0xffffffff || (src >> 28) == 14 || (src >> 24) == 127) return;
    if (((src ^ cfg.ip) & cfg.mask) == 0 && (src | cfg.mask) == 0xffffffff) return;  /* subnet broadcast */
    /* glean an on-link sender's MAC to skip an ARP round trip (replies to
     * off-link senders go to the gateway, which is resolved by ARP) */
    if (!((src ^ cfg.ip) & cfg.mask) && !arp_find(src)) arp_update(src, eth + 6, 1);
    u8 *pl = ip + ihl;
    u32 plen = tot - ihl;
    switch (ip[9]) {
    case 1: icmp_rx(src, pl, plen); break;
    case 6: tcp_rx(src, dst, pl, plen); break;
    case 17: udp_rx(src, dst, ip, tot, pl, plen); break;
    default: icmp_unreach(src, ip, tot, 2); break;
    }
}

void net_rx(u8 *f, u32 len)
{
    if (len < ETH_HLEN) return;
    if (!mac_eq(f, cfg.mac) && !mac_eq(f, bcast)) return;
    u16 type = get16(f + 12);
    if (type == 0x0806) arp_rx(f + ETH_HLEN, len - ETH_HLEN);
    else if (type == 0x0800) ip_rx(f, f + ETH_HLEN, len - ETH_HLEN);
}

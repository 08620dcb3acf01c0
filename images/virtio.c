/* virtio-net over virtio-mmio (legacy v1 and modern v2), as placed by
 * QEMU microvm: 512-byte transports from 0xfeb00000; IRQ line GSI 24+slot
 * when the second IOAPIC exists (ACPI on, the default), else 5+slot, or as
 * given by a "virtio_mmio.device=512@0x...:IRQ" token on the command line. */
#include "common.h"

#define VIRTIO_MMIO_BASE 0xfeb00000UL
#define VIRTIO_MMIO_SLOTS 24
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_HOST_FEATURES 0x010
#define R_HOST_FEATURES_SEL 0x014
#define R_GUEST_FEATURES 0x020
#define R_GUEST_FEATURES_SEL 0x024
#define R_GUEST_PAGE_SIZE 0x028
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_ALIGN 0x03c
#define R_QUEUE_PFN 0x040
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_STATUS 0x060
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LO 0x080
#define R_QUEUE_DESC_HI 0x084
#define R_QUEUE_AVAIL_LO 0x090
#define R_QUEUE_AVAIL_HI 0x094
#define R_QUEUE_USED_LO 0x0a0
#define R_QUEUE_USED_HI 0x0a4
#define R_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define F_MAC (1u << 5)
#define F_VERSION_1_HI (1u << 0)    /* feature bit 32 */
#define DESC_F_WRITE 2

#define QMAX 128
#define BUFSZ 2048

struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vavail { u16 flags, idx, ring[]; };
struct vused_elem { u32 id, len; };
struct vused { u16 flags, idx; struct vused_elem ring[]; };

struct vq {
    u32 num;
    struct vdesc *desc;
    struct vavail *avail;
    volatile struct vused *used;
    u16 last_used;
    u8 *bufs;
};

static u64 dev;
static u32 version, hdr_len;
static struct vq rxq, txq;
static int tx_kick;
int arch_has_ioapic2(void);

static inline u32 rd(u32 r) { return mmio_r32(dev + r); }
static inline void wr(u32 r, u32 v) { mmio_w32(dev + r, v); }

static int setup_queue(int idx, struct vq *q)
{
    wr(R_QUEUE_SEL, (u32)idx);
    u32 max = rd(R_QUEUE_NUM_MAX);
    if (max == 0) return -1;
    u32 num = QMAX;
    while (num > max) num >>= 1;
    q->num = num;
    u64 avail_off = 16UL * num;
    u64 used_off = (avail_off + 6 + 2UL * num + 4095) & ~4095UL;
    u64 total = used_off + ((6 + 8UL * num + 4095) & ~4095UL);
    u8 *mem = heap_alloc(total, 4096);     /* fresh RAM: already zero */
    if (!mem) return -1;
    q->desc = (struct vdesc *)mem;
    q->avail = (struct vavail *)(mem + avail_off);
    q->used = (volatile struct vused *)(mem + used_off);
    /* fresh RAM is zero, but after a guest reset this memory is not: the ring
     * indices are all that must start at 0 (descriptors are written before use) */
    q->avail->flags = 0;
    q->avail->idx = 0;
    q->used->flags = 0;
    q->used->idx = 0;
    q->last_used = 0;
    q->bufs = heap_alloc((u64)num * BUFSZ, 4096);
    if (!q->bufs) return -1;
    wr(R_QUEUE_NUM, num);
    if (version == 1) {
        wr(R_QUEUE_ALIGN, 4096);
        wr(R_QUEUE_PFN, (u32)((u64)mem >> 12));
    } else {
        wr(R_QUEUE_DESC_LO, (u32)(u64)q->desc);
        wr(R_QUEUE_DESC_HI, 0);
        wr(R_QUEUE_AVAIL_LO, (u32)(u64)q->avail);
        wr(R_QUEUE_AVAIL_HI, 0);
        wr(R_QUEUE_USED_LO, (u32)(u64)q->used);
        wr(R_QUEUE_USED_HI, 0);
        wr(R_QUEUE_READY, 1);
    }
    return 0;
}

/* "virtio_mmio.device=512@0xADDR:IRQ", which microvm appends to the command
 * line when ACPI is off (captured by parse_cmdline): the transport and GSI. */
static int cmdline_hint(u64 *addr, int *irq)
{
    const char *h = virtio_hint;
    u32 n = virtio_hint_len;
    if (!h || n < 7 || memcmp(h, "512@0x", 6)) return -1;
    u32 j = 6;
    u64 a = 0;
    for (; j < n; j++) {
        char c = h[j];
        if (c >= '0' && c <= '9') a = a * 16 + (u64)(c - '0');
        else if (c >= 'a' && c <= 'f') a = a * 16 + (u64)(c - 'a' + 10);
        else break;
    }
    if (j >= n || h[j] != ':') return -1;
    u32 v;
    if (a < VIRTIO_MMIO_BASE || a >= VIRTIO_MMIO_BASE + 512UL * VIRTIO_MMIO_SLOTS ||
        parse_uint(h + j + 1, (int)(n - j - 1), &v) || v >= 48)
        return -1;
    if (mmio_r32(a + R_MAGIC) != 0x74726976 || mmio_r32(a + R_DEVICE_ID) != 1) return -1;
    *addr = a;
    *irq = (int)v;
    return 0;
}

#define RX_FIRST 32

/* make descriptors [from, to) device-writable receive buffers and available */
static void rx_post(u32 from, u32 to)
{
    u8 *b = rxq.bufs + (u64)from * BUFSZ;
    u16 idx = rxq.avail->idx;
    for (u32 i = from; i < to; i++, b += BUFSZ) {
        rxq.desc[i].addr = (u64)b;
        rxq.desc[i].len = BUFSZ;
        rxq.desc[i].flags = DESC_F_WRITE;
        rxq.avail->ring[idx++ % rxq.num] = (u16)i;
    }
    barrier();
    rxq.avail->idx = idx;
}

void virtio_rx_fill_rest(void)
{
    if (rxq.num <= RX_FIRST) return;
    rx_post(RX_FIRST, rxq.num);
    barrier();
    wr(R_QUEUE_NOTIFY, 0);
}

int virtio_net_init(u8 mac[6])
{
    int slot = -1, gsi = -1;
    u64 hint;
    if (cmdline_hint(&hint, &gsi) == 0) {
        dev = hint;
        slot = (int)((hint - VIRTIO_MMIO_BASE) / 512);
    } else {
        /* QEMU plugs devices into the highest free transport, so probe down */
        for (int i = VIRTIO_MMIO_SLOTS - 1; i >= 0; i--) {
            u64 base = VIRTIO_MMIO_BASE + 512UL * (u64)i;
            if (mmio_r32(base + R_MAGIC) != 0x74726976 || mmio_r32(base + R_DEVICE_ID) != 1) continue;
            slot = i;
            dev = base;
            break;
        }
    }
    if (slot < 0) return -1;
    version = rd(R_VERSION);
    if (version != 1 && version != 2) return -1;
    hdr_len = version == 1 ? 10 : 12;

    wr(R_STATUS, 0);
    wr(R_STATUS, S_ACK);
    wr(R_STATUS, S_ACK | S_DRIVER);
    wr(R_HOST_FEATURES_SEL, 0);
    u32 f0 = rd(R_HOST_FEATURES) & F_MAC;
    wr(R_GUEST_FEATURES_SEL, 0);
    wr(R_GUEST_FEATURES, f0);
    if (version == 2) {
        wr(R_HOST_FEATURES_SEL, 1);
        if (!(rd(R_HOST_FEATURES) & F_VERSION_1_HI)) return -1;
        wr(R_GUEST_FEATURES_SEL, 1);
        wr(R_GUEST_FEATURES, F_VERSION_1_HI);
        wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if (!(rd(R_STATUS) & S_FEATURES_OK)) return -1;
    } else {
        wr(R_GUEST_PAGE_SIZE, 4096);
    }
    if (setup_queue(0, &rxq) || setup_queue(1, &txq)) return -1;

    if (f0 & F_MAC) {
        for (int i = 0; i < 6; i++) mac[i] = mmio_r8(dev + R_CONFIG + (u64)i);
    } else {
        u64 t = rdtsc();
        mac[0] = 0x52; mac[1] = 0x54; mac[2] = 0x00;
        mac[3] = (u8)t; mac[4] = (u8)(t >> 8); mac[5] = (u8)(t >> 16);
    }

    /* a first batch of receive buffers; the rest once idle after READY */
    rx_post(0, rxq.num < RX_FIRST ? rxq.num : RX_FIRST);

    if (gsi < 0) gsi = arch_has_ioapic2() ? 24 + slot : 5 + slot;
    irq_route(gsi, VEC_NET);

    u32 st = S_ACK | S_DRIVER | S_DRIVER_OK | (version == 2 ? S_FEATURES_OK : 0);
    wr(R_STATUS, st);
    barrier();
    wr(R_QUEUE_NOTIFY, 0);
    return 0;
}

void net_irq(void)
{
    if (!dev) return;
    for (int i = 0; i < 8; i++) {
        u32 s = rd(R_INT_STATUS);
        if (!s) break;
        wr(R_INT_ACK, s);
    }
}

int net_poll(void)
{
    int n = 0;
    u16 added = 0;
    while (rxq.last_used != rxq.used->idx && n < (int)rxq.num) {
        barrier();
        volatile struct vused_elem *e = &rxq.used->ring[rxq.last_used % rxq.num];
        u32 id = e->id, len = e->len;
        rxq.last_used++;
        n++;
        if (id >= rxq.num) continue;
        if (len > hdr_len && len <= BUFSZ)
            net_rx(rxq.bufs + (u64)id * BUFSZ + hdr_len, len - hdr_len);
        rxq.avail->ring[(u16)(rxq.avail->idx + added) % rxq.num] = (u16)id;
        added++;
    }
    if (added) {
        barrier();
        rxq.avail->idx = (u16)(rxq.avail->idx + added);
        barrier();
        wr(R_QUEUE_NOTIFY, 0);
    }
    return n;
}

/* TX: QEMU completes in order, so descriptor i (= avail slot i) is reused
 * once the used index has passed it. One buffer is handed out at a time. */
u8 *net_tx_buf(void)
{
    u16 inflight = (u16)(txq.avail->idx - txq.used->idx);
    if (inflight >= txq.num) {
        net_tx_flush();
        return NULL;
    }
    u32 id = txq.avail->idx % txq.num;
    u8 *b = txq.bufs + (u64)id * BUFSZ;
    memset(b, 0, hdr_len);
    return b + hdr_len;
}

void net_tx_send(u8 *buf, u32 len)
{
    u32 id = txq.avail->idx % txq.num;
    if (len < 60) { memset(buf + len, 0, 60 - len); len = 60; }
    txq.desc[id].addr = (u64)(buf - hdr_len);
    txq.desc[id].len = len + hdr_len;
    txq.desc[id].flags = 0;
    txq.avail->ring[id] = (u16)id;
    barrier();
    txq.avail->idx++;
    tx_kick = 1;
}

/* nothing to undo: net_tx_buf() claims the slot only when the frame is sent */
void net_tx_drop(u8 *buf) { (void)buf; }

void net_tx_flush(void)
{
    if (tx_kick) {
        tx_kick = 0;
        barrier();
        wr(R_QUEUE_NOTIFY, 1);
    }
}

/* Entry from boot.S: parse the command line, bring up the NIC, serve. */
#include "common.h"

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
#define HVM_START_MAGIC 0x336ec578

struct netcfg cfg;
const char *virtio_hint;
u32 virtio_hint_len;

/* ip=10.0.2.15/24 gw=10.0.2.2 port=80 udp=7 name=hello; unknown tokens are ignored */
static void parse_cmdline(const char *cl)
{
    cfg.ip = 0x0a00020f;
    cfg.mask = 0xffffff00;
    cfg.gw = 0x0a000202;
    cfg.port = 80;
    cfg.udp_port = 7;
    memcpy(cfg.name, "hello", 6);
    if (!cl) return;
    u32 len = find_byte(cl, 4096, 0);
    for (u32 i = 0; i < len;) {
        if (cl[i] == ' ') { i++; continue; }
        u32 start = i;
        i += find_byte(cl + i, len - i, ' ');
        const char *t = cl + start;
        int n = (int)(i - start), eq = -1;
        static const char vkey[] = "virtio_mmio.device=";
        if (t[0] == 'v' && n > (int)sizeof(vkey) - 1 && !memcmp(t, vkey, sizeof(vkey) - 1)) {
            virtio_hint = t + sizeof(vkey) - 1;     /* added by microvm when ACPI is off */
            virtio_hint_len = (u32)n - (u32)(sizeof(vkey) - 1);
            continue;
        }
        for (int j = 0; j < n && j < 5; j++) if (t[j] == '=') { eq = j; break; }
        if (eq <= 0) continue;              /* not one of ours (keys are 2-4 chars) */
        const char *v = t + eq + 1;
        int vn = n - eq - 1;
        u32 x, key = 0;
        for (int j = 0; j < eq; j++) key = key << 8 | (u8)t[j];
#define K2(a, b) ((u32)(a) << 8 | (b))
#define K3(a, b, c) (K2(a, b) << 8 | (c))
#define K4(a, b, c, d) (K3(a, b, c) << 8 | (d))
        if (key == K2('i', 'p')) {
            int slash = -1;
            for (int j = 0; j < vn; j++) if (v[j] == '/') slash = j;
            u32 ip, pl = 24;
            if (parse_ip(v, slash < 0 ? vn : slash, &ip) == 0 &&
                (slash < 0 || (parse_uint(v + slash + 1, vn - slash - 1, &pl) == 0 && pl <= 32))) {
                cfg.ip = ip;
                cfg.mask = pl ? 0xffffffffu << (32 - pl) : 0;
            } else kprintf("bad ip= value, using default\n");
        } else if (key == K2('g', 'w')) {
            if (parse_ip(v, vn, &x) == 0) cfg.gw = x;
            else kprintf("bad gw= value\n");
        } else if (key == K4('p', 'o', 'r', 't')) {
            if (parse_uint(v, vn, &x) == 0 && x > 0 && x < 65536) cfg.port = (u16)x;
            else kprintf("bad port= value\n");
        } else if (key == K3('u', 'd', 'p')) {
            if (parse_uint(v, vn, &x) == 0 && x < 65536) cfg.udp_port = (u16)x;
            else kprintf("bad udp= value\n");
        } else if (key == K4('n', 'a', 'm', 'e')) {
            int m = vn < (int)sizeof(cfg.name) - 1 ? vn : (int)sizeof(cfg.name) - 1;
            /* keep the name HTML-safe */
            int o = 0;
            for (int j = 0; j < m; j++) {
                char c = v[j];
                if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.')
                    cfg.name[o++] = c;
            }
            cfg.name[o] = 0;
        }
    }
}

void kmain(struct hvm_start_info *si)
{
    const char *cl = NULL;
    if (si && si->magic == HVM_START_MAGIC && si->cmdline_paddr)
        cl = (const char *)si->cmdline_paddr;
    else
        kprintf("no PVH start info\n");
    /* the RAM region holding the image bounds the heap (and so the memory
     * needed: about 1 MiB plus 16 KiB per TCP connection in use) */
    if (si && si->magic == HVM_START_MAGIC && si->version >= 1 && si->memmap_paddr) {
        const struct { u64 addr, size; u32 type, reserved; } *m = (const void *)si->memmap_paddr;
        for (u32 i = 0; i < si->memmap_entries && i < 64; i++)
            if (m[i].type == 1 && m[i].addr <= 0x100000 && m[i].addr + m[i].size > 0x100000)
                heap_limit = m[i].addr + m[i].size < 0x4000000 ? m[i].addr + m[i].size : 0x4000000;
    }
    parse_cmdline(cl);
    arch_init();
    if (virtio_net_init(cfg.mac) < 0) panic("no virtio-net device");
    tcp_init();
    arp_announce();
    net_tx_flush();
    {
        /* the readiness line, without printf (every instruction counts here) */
        char r[32] = "READY ";
        int n = 6 + fmt_ip(r + 6, cfg.ip);
        r[n++] = ':';
        n += fmt_uint(r + n, cfg.port);
        r[n++] = '\n';
        con_write(r, (u32)n);
    }
    sti();
    int info_done = 0;
    for (;;) {
        irq_pending = 0;
        int n = net_poll();
        net_timer();
        tcp_timer();
        net_tx_flush();
        timer_set(tcp_active() || arp_pending());
        if (!n) {
            if (!info_done) {   /* after READY, once nothing else is waiting */
                info_done = 1;
                virtio_rx_fill_rest();
                kprintf("hello: name=%s gw=%I mac=%02x:%02x:%02x:%02x:%02x:%02x\n", cfg.name,
                        cfg.gw, cfg.mac[0], cfg.mac[1], cfg.mac[2], cfg.mac[3], cfg.mac[4],
                        cfg.mac[5]);
                continue;
            }
            idle();
        }
    }
}

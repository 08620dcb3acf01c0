/* Shared definitions for the hello unikernel. Freestanding x86-64. */
#ifndef COMMON_H
#define COMMON_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed int i32;
typedef signed long i64;
typedef unsigned long size_t;
#define NULL ((void *)0)

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }

static inline u16 htons(u16 x) { return (u16)((x << 8) | (x >> 8)); }
static inline u16 ntohs(u16 x) { return htons(x); }
static inline u32 htonl(u32 x) { return __builtin_bswap32(x); }
static inline u32 ntohl(u32 x) { return __builtin_bswap32(x); }

/* lib.c */
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
u32 find_byte(const void *p, u32 n, u8 c);
void con_write(const char *s, u32 n);
void con_putc(char c);
void con_puts(const char *s);
void kprintf(const char *fmt, ...);
int ksnprintf(char *buf, int size, const char *fmt, ...);
int parse_ip(const char *s, int n, u32 *ip);
int parse_uint(const char *s, int n, u32 *v);
int fmt_ip(char *buf, u32 ip);
int fmt_uint(char *buf, u32 v);
void panic(const char *msg) __attribute__((noreturn));

/* arch.c */
extern volatile u64 jiffies;          /* 10 ms ticks while the timer runs */
extern volatile u32 irq_pending;
#define HZ 100
void arch_init(void);
void irq_route(int gsi, int vector);
void timer_set(int on);
void idle(void);
#define VEC_NET 0x30
#define VEC_TIMER 0x40
#define VEC_SPURIOUS 0xff

/* heap: simple bump allocator over RAM above the image */
void *heap_alloc(u64 size, u64 align);
extern u64 heap_limit;

/* virtio.c */
int virtio_net_init(u8 mac[6]);
int net_poll(void);
void virtio_rx_fill_rest(void);                    /* processes received frames; returns count */
u8 *net_tx_buf(void);                 /* returns buffer for an Ethernet frame, or NULL */
void net_tx_send(u8 *buf, u32 len);
void net_tx_flush(void);
void net_tx_drop(u8 *buf);
void net_irq(void);

/* net.c */
struct netcfg {
    u32 ip, mask, gw;                  /* host byte order */
    u16 port, udp_port;
    char name[64];
    u8 mac[6];
};
extern struct netcfg cfg;
extern const char *virtio_hint;   /* "512@0x...:IRQ" from the command line, or NULL */
extern u32 virtio_hint_len;
void net_rx(u8 *frame, u32 len);
void net_timer(void);
int arp_pending(void);
void arp_announce(void);
void ip_discard(u8 *payload);
u16 csum_partial(const void *data, u32 len, u32 sum);
u16 csum_fold(u32 sum);
u32 csum_add(const void *data, u32 len, u32 sum);
int ip_send(u32 dst, u8 proto, const u8 *payload, u32 len, const u8 *payload2, u32 len2);
u8 *ip_alloc(u32 *room);
void ip_finish(u8 *frame, u32 dst, u8 proto, u32 payload_len);
u32 ip_pseudo(u32 src, u32 dst, u8 proto, u32 len);

/* tcp.c */
void tcp_init(void);
void tcp_rx(u32 src, u32 dst, u8 *seg, u32 len);
void tcp_timer(void);
int tcp_active(void);

/* http.c */
struct tcb;
int http_on_data(struct tcb *c);   /* returns 1 when it needs more input */

#endif

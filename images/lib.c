/* Minimal libc pieces and the COM1 console. */
#include "common.h"
#include <stdarg.h>

#define COM1 0x3f8

/* String instructions: under kvm_pvm's instruction emulation each rep
 * iteration costs about as much as one instruction, so move 8 bytes at a
 * time. Forward copies are also safe for overlapping moves with d < s. */
void *memcpy(void *d, const void *s, size_t n)
{
    void *r = d;
    size_t q = n >> 3;
    __asm__ volatile("rep movsq" : "+D"(d), "+S"(s), "+c"(q) : : "memory");
    n &= 7;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}

void *memmove(void *d, const void *s, size_t n)
{
    if ((u8 *)d <= (const u8 *)s || (u8 *)d >= (const u8 *)s + n) return memcpy(d, s, n);
    u8 *dp = (u8 *)d + n;
    const u8 *sp = (const u8 *)s + n;
    while (n--) *--dp = *--sp;
    return d;
}

void *memset(void *d, int c, size_t n)
{
    void *r = d;
    u64 v = (u8)c * 0x0101010101010101UL;
    size_t q = n >> 3;
    __asm__ volatile("rep stosq" : "+D"(d), "+c"(q) : "a"(v) : "memory");
    n &= 7;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(v) : "memory");
    return r;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y) return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    return find_byte(s, 0xffffffffu, 0);
}

/* Index of the first c in p[0..n), or n. One repne scasb: under kvm_pvm's
 * emulation a rep iteration is far cheaper than a loop of instructions. */
u32 find_byte(const void *p, u32 n, u8 c)
{
    if (!n) return 0;
    const u8 *q = p;
    u64 cnt = n;
    __asm__ volatile("repne scasb" : "+D"(q), "+c"(cnt) : "a"(c) : "cc", "memory");
    if (q[-1] == c) return (u32)(q - (const u8 *)p) - 1;
    return n;
}

/* COM1 output. QEMU's UART hands each byte to the chardev synchronously,
 * so no LSR polling; one rep outsb per string. */
void con_write(const char *s, u32 n)
{
    u64 c = n;
    __asm__ volatile("rep outsb" : "+S"(s), "+c"(c) : "d"(COM1) : "memory");
}

void con_putc(char c) { con_write(&c, 1); }

void con_puts(const char *s) { con_write(s, (u32)strlen(s)); }

struct outbuf { char *buf; int size, len; };

static void ob_put(struct outbuf *o, char c)
{
    if (o->len < o->size - 1) o->buf[o->len] = c;
    o->len++;
}

static void ob_num(struct outbuf *o, u64 v, int base, int width, char pad)
{
    char tmp[24];
    int n = 0;
    do { tmp[n++] = "0123456789abcdef"[v % base]; v /= base; } while (v);
    while (n < width) tmp[n++] = pad;
    while (n) ob_put(o, tmp[--n]);
}

static void vformat(struct outbuf *o, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') { ob_put(o, *fmt); continue; }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        if (*fmt == 'l') { lng = 1; fmt++; }
        switch (*fmt) {
        case 'd': {
            i64 v = lng ? va_arg(ap, i64) : va_arg(ap, i32);
            if (v < 0) { ob_put(o, '-'); v = -v; }
            ob_num(o, (u64)v, 10, width, pad);
            break;
        }
        case 'u': ob_num(o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad); break;
        case 'x': ob_num(o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad); break;
        case 'p': ob_put(o, '0'); ob_put(o, 'x'); ob_num(o, (u64)va_arg(ap, void *), 16, width, pad); break;
        case 'c': ob_put(o, (char)va_arg(ap, int)); break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "(null)";
            while (*s) ob_put(o, *s++);
            break;
        }
        case 'I': { /* IPv4 address, host order */
            u32 ip = va_arg(ap, u32);
            for (int i = 3; i >= 0; i--) {
                ob_num(o, (ip >> (i * 8)) & 0xff, 10, 0, ' ');
                if (i) ob_put(o, '.');
            }
            break;
        }
        case '%': ob_put(o, '%'); break;
        default: ob_put(o, '%'); ob_put(o, *fmt); break;
        }
    }
}

void kprintf(const char *fmt, ...)
{
    char buf[256];
    struct outbuf o = { buf, sizeof(buf), 0 };
    va_list ap;
    va_start(ap, fmt);
    vformat(&o, fmt, ap);
    va_end(ap);
    con_write(buf, (u32)(o.len < o.size - 1 ? o.len : o.size - 1));
}

int ksnprintf(char *buf, int size, const char *fmt, ...)
{
    struct outbuf o = { buf, size, 0 };
    va_list ap;
    va_start(ap, fmt);
    vformat(&o, fmt, ap);
    va_end(ap);
    if (size > 0) buf[o.len < size ? o.len : size - 1] = 0;
    return o.len;
}

int parse_uint(const char *s, int n, u32 *v)
{
    u64 x = 0;
    if (n <= 0 || n > 10) return -1;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        x = x * 10 + (u64)(s[i] - '0');
    }
    if (x > 0xffffffffUL) return -1;
    *v = (u32)x;
    return 0;
}

/* dotted quad, exactly n characters */
int parse_ip(const char *s, int n, u32 *ip)
{
    u32 r = 0;
    int part = 0, start = 0;
    for (int i = 0; i <= n; i++) {
        if (i == n || s[i] == '.') {
            u32 v;
            if (parse_uint(s + start, i - start, &v) || v > 255 || i - start > 3) return -1;
            r = (r << 8) | v;
            part++;
            start = i + 1;
        }
    }
    if (part != 4) return -1;
    *ip = r;
    return 0;
}

int fmt_uint(char *buf, u32 v)
{
    char t[10];
    int n = 0, o = 0;
    do { t[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) buf[o++] = t[--n];
    return o;
}

int fmt_ip(char *buf, u32 ip)
{
    int o = 0;
    for (int i = 3; i >= 0; i--) {
        o += fmt_uint(buf + o, (ip >> (i * 8)) & 0xff);
        if (i) buf[o++] = '.';
    }
    return o;
}

void panic(const char *msg)
{
    kprintf("PANIC %s\n", msg);
    for (;;) __asm__ volatile("cli; hlt");
}

/* IDT, exceptions, 8259 masking, LAPIC, IOAPIC, LAPIC timer, idle. */
#include "common.h"

#define LAPIC 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define IOAPIC1 0xfec00000UL
#define IOAPIC2 0xfec10000UL

/* QEMU and KVM both clock the LAPIC timer at 1 GHz (1 ns per count at
 * divide-by-1); 10 ms = 10,000,000 counts. */
#define TIMER_COUNT 10000000u

volatile u64 jiffies;
volatile u32 irq_pending;
static int timer_on;
static int have_ioapic2;
static u32 apic_id;

extern char idt_desc[];
extern char __image_end[];

void exception_handler(u64 *frame)
{
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    kprintf("EXCEPTION vector=%u error=%lx rip=%lx cr2=%lx rsp=%lx\n",
            (u32)frame[0], frame[1], frame[2], cr2, frame[5]);
    for (;;) __asm__ volatile("cli; hlt");
}

static inline void lapic_w(u32 reg, u32 v) { mmio_w32(LAPIC + reg, v); }
static inline u32 lapic_r(u32 reg) { return mmio_r32(LAPIC + reg); }

static u32 ioapic_r(u64 base, u32 reg) { mmio_w32(base, reg); return mmio_r32(base + 0x10); }
static void ioapic_w(u64 base, u32 reg, u32 v) { mmio_w32(base, reg); mmio_w32(base + 0x10, v); }

void irq_net(void)
{
    net_irq();
    irq_pending = 1;
    lapic_w(LAPIC_EOI, 0);
}

void irq_timer(void)
{
    jiffies++;
    irq_pending = 1;
    lapic_w(LAPIC_EOI, 0);
}

void arch_init(void)
{
    __asm__ volatile("lidt (%0)" : : "r"(idt_desc) : "memory");   /* static, see boot.S */

    /* mask both 8259s (ICW sequence not needed for masking) */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    /* PIT channel 0 to one-shot (mode 0): the firmware's 18.2 Hz periodic
     * tick would keep the host's PIT timer running for nothing */
    outb(0x43, 0x30);
    outb(0x40, 0);
    outb(0x40, 0);

    lapic_w(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    apic_id = lapic_r(LAPIC_ID) >> 24;
    lapic_w(LAPIC_LVT_TIMER, 0x10000 | VEC_TIMER);   /* masked until needed */
    lapic_w(LAPIC_TIMER_DIV, 0xb);                   /* divide by 1 */

    /* IOAPIC pins come out of reset masked; detect microvm's second
     * IOAPIC (present when ACPI is on, the default) */
    u32 ver = ioapic_r(IOAPIC2, 1);
    have_ioapic2 = (ver & 0xff) == 0x11 || (ver & 0xff) == 0x20;
}

int arch_has_ioapic2(void) { return have_ioapic2; }

/* Route a GSI (0-23 first IOAPIC, 24-47 second) edge-triggered, active
 * high. The device interrupt handler acks until InterruptStatus reads 0,
 * so every new event is a fresh rising edge. */
void irq_route(int gsi, int vector)
{
    u64 base = IOAPIC1;
    int pin = gsi;
    if (gsi >= 24) { base = IOAPIC2; pin = gsi - 24; }
    ioapic_w(base, 0x11 + 2 * pin, apic_id << 24);
    ioapic_w(base, 0x10 + 2 * pin, (u32)vector);
}

void timer_set(int on)
{
    if (on == timer_on) return;
    timer_on = on;
    if (on) {
        lapic_w(LAPIC_LVT_TIMER, (1u << 17) | VEC_TIMER);   /* periodic */
        lapic_w(LAPIC_TIMER_INIT, TIMER_COUNT);
    } else {
        lapic_w(LAPIC_TIMER_INIT, 0);
        lapic_w(LAPIC_LVT_TIMER, 0x10000 | VEC_TIMER);
    }
}

/* Sleep until an interrupt arrives unless one already did. */
void idle(void)
{
    cli();
    if (irq_pending) { sti(); return; }
    __asm__ volatile("sti; hlt" ::: "memory");
}

static u64 heap_ptr;
u64 heap_limit = 0x400000;   /* raised from the PVH memory map in kmain */

/* Bump allocator; NULL when guest RAM (or the 64 MiB identity map) runs out. */
void *heap_alloc(u64 size, u64 align)
{
    /* Right after the image (at 1 MiB): QEMU backs guest RAM with 2 MiB huge
     * pages, so staying below 2 MiB while idle keeps the process RSS down.
     * The PVH start info and command line live below 1 MiB. */
    if (!heap_ptr) heap_ptr = (u64)__image_end;
    u64 p = (heap_ptr + align - 1) & ~(align - 1);
    if (p + size > heap_limit) return NULL;
    heap_ptr = p + size;
    return (void *)p;
}

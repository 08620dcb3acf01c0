/*
 * PVH entry: QEMU (microvm + qboot) jumps to pvh_start in 32-bit protected
 * mode, paging off, flat segments, %ebx = physical address of hvm_start_info.
 * We identity-map the low 64 MiB and the 0xfe000000 MMIO window (2 MiB
 * pages), enter long mode, load a GDT and jump to kmain(start_info).
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.Xen, "a"
    .p2align 2
    .long 4                 /* namesz */
    .long 4                 /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_start

    .section .text.boot, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %esi                 /* keep start_info pointer */

    /* Fresh QEMU guest RAM is zero, so page tables and .bss are not
     * cleared: under kvm_pvm this code is instruction-emulated (~1 us per
     * instruction), so boot does as little as possible. */
    /* PML4[0] -> PDPT; PDPT[0] -> PD0 (low 64 MiB), PDPT[3] -> PD3 (MMIO) */
    movl $(pdpt + 3), pml4
    movl $(pd0 + 3), pdpt
    movl $(pd3 + 3), pdpt + 24
    /* PD0: 32 x 2 MiB identity, present|rw|PS */
    movl $pd0, %edi
    movl $0x83, %eax
1:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    cmpl $(0x4000000 + 0x83), %eax
    jne 1b
    /* PD3: 0xfe000000-0xffffffff (virtio-mmio, IOAPIC, LAPIC), PCD|PWT */
    movl $(pd3 + 496 * 8), %edi
    movl $(0xfe000000 + 0x9b), %eax
2:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    cmpl $(pd3 + 4096), %edi
    jne 2b

    /* CR4.PAE */
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    /* EFER.LME */
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    /* paging + protection, WP */
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0

    lgdt gdt_desc
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $stack_top, %rsp
    movl %esi, %edi                 /* start_info (zero-extended) */
    call kmain
4:  cli
    hlt
    jmp 4b

/* ---- interrupt stubs ---- */
    .macro EXC_NOERR n
    .globl exc\n
exc\n:
    pushq $0
    pushq $\n
    jmp exc_common
    .endm
    .macro EXC_ERR n
    .globl exc\n
exc\n:
    pushq $\n
    jmp exc_common
    .endm

EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR 8
EXC_NOERR 9
EXC_ERR 10
EXC_ERR 11
EXC_ERR 12
EXC_ERR 13
EXC_ERR 14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR 17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR 21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR 29
EXC_ERR 30
EXC_NOERR 31

exc_common:
    /* stack: vector, error, rip, cs, rflags, rsp, ss */
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_handler          /* never returns */
5:  cli
    hlt
    jmp 5b

    .macro IRQ_STUB name, fn
    .globl \name
\name:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    cld
    call \fn
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    iretq
    .endm

IRQ_STUB irq_net_entry, irq_net
IRQ_STUB irq_timer_entry, irq_timer
    .globl irq_spurious_entry
irq_spurious_entry:
    iretq

/* Static IDT, built by the assembler: every handler lives in this section,
 * in the first 64 KiB of the image at 0x100000, so offset[15:0] is the
 * distance from pvh_start and offset[31:16] is 0x0010. 256 entries; the
 * unused ones are not present (#NP, reported by the vector-11 handler). */
    .macro GATE handler
    .word \handler - pvh_start
    .word 0x08
    .word 0x8e00
    .word 0x0010
    .long 0
    .long 0
    .endm
    .macro NOGATE
    .quad 0
    .quad 0
    .endm
    .p2align 4
    .globl idt_table
idt_table:
    GATE exc0
    GATE exc1
    GATE exc2
    GATE exc3
    GATE exc4
    GATE exc5
    GATE exc6
    GATE exc7
    GATE exc8
    GATE exc9
    GATE exc10
    GATE exc11
    GATE exc12
    GATE exc13
    GATE exc14
    GATE exc15
    GATE exc16
    GATE exc17
    GATE exc18
    GATE exc19
    GATE exc20
    GATE exc21
    GATE exc22
    GATE exc23
    GATE exc24
    GATE exc25
    GATE exc26
    GATE exc27
    GATE exc28
    GATE exc29
    GATE exc30
    GATE exc31
    .rept 0x30 - 32
    NOGATE
    .endr
    GATE irq_net_entry              /* 0x30 VEC_NET */
    .rept 0x40 - 0x31
    NOGATE
    .endr
    GATE irq_timer_entry            /* 0x40 VEC_TIMER */
    .rept 0xff - 0x41
    NOGATE
    .endr
    GATE irq_spurious_entry         /* 0xff VEC_SPURIOUS */
idt_end:
    .p2align 3
    .word 0, 0, 0
    .globl idt_desc
idt_desc:
    .word idt_end - idt_table - 1
    .quad idt_table

    .section .rodata
    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
gdt_end:
    .p2align 3
    .word 0
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .bss.pagetables, "aw", @nobits
    .p2align 12
pml4: .skip 4096
pdpt: .skip 4096
pd0:  .skip 4096
pd3:  .skip 4096
    .section .bss
    .p2align 4
stack_bottom:
    .skip 32768
stack_top:

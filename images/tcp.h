/* TCP connection block, shared between tcp.c and http.c. */
#ifndef TCP_H
#define TCP_H
#include "common.h"

#define TCP_SLOTS 128
#define TCP_RXBUF 8192
#define TCP_TXBUF 8192

enum { CLOSED = 0, SYN_RCVD, ESTABLISHED, CLOSE_WAIT, LAST_ACK, FIN_WAIT_1, FIN_WAIT_2, CLOSING, TIME_WAIT };

struct tcb {
    u8 state;
    u8 fin_pending;       /* application closed: FIN after queued data */
    u8 fin_sent;
    u8 ack_now;
    u8 rexmits;
    u8 rx_closed;         /* discard further input */
    u16 rport, mss;
    u32 rip;
    u32 iss, irs;
    u32 snd_una, snd_nxt, snd_max, snd_wnd, snd_wl1, snd_wl2;
    u32 fin_seq;          /* sequence number of our FIN once sent */
    u8 fin_once;
    u32 rcv_nxt, adv_wnd;
    u32 rto;              /* jiffies */
    u64 rt_deadline;      /* retransmit/persist timer, 0 = off */
    u64 idle_deadline;
    u8 *rx; u32 rxlen;    /* in-order bytes not yet consumed by the application */
    u8 *tx; u32 txlen;    /* bytes from snd_una on (sent-unacked, then unsent) */
    u32 discard;          /* request body bytes still to skip (HTTP) */
    struct tcb *hnext;    /* hash chain */
    u16 aidx;             /* index in the active list */
};

u32 tcp_write(struct tcb *c, const void *data, u32 len);
u32 tcp_tx_space(struct tcb *c);
void tcp_consume(struct tcb *c, u32 n);
void tcp_close(struct tcb *c);

#endif

void net_irq(void) {}

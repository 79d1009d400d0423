"""Real lossy links on one machine (root): network namespaces, iptables drops, rate caps, delays."""

"""nfq_ipsec: IPsec (ESP/AH) in user space on top of Linux NFQUEUE.

The package is split into a sans-I/O core (packet parsing, transforms, SA/SPD state,
the decision pipeline) and thin adapters (NFQUEUE, iptables hooks, CLI, control socket).
"""

__version__ = "0.1.0"

"""The placement decision, pure and synchronous: fit, score, choose.

Nothing here does I/O, sleeps or logs; adapters feed it data and act on what it returns.
That is what lets one core serve the bus, the kube-scheduler extender and ``vslice replay``.
"""

"""Run the NVML backend in a fresh process (NVML attaches to one mock card per process).

``python -m tests.nodeagent.nvmlcheck discover|read|xids|inject [ARGS]`` prints JSON: what
``NvmlGpus`` discovers, reads, or the XIDs it sees after the mock NVML injects ARGS
(``<index>:<xid>`` ...); ``inject`` only injects them (for another process to see).
The library is found the way pynvml finds it in production: ``libnvidia-ml.so.1`` by
name, here from the ``LD_LIBRARY_PATH`` the test sets.
"""

from __future__ import annotations

import json
import sys

import msgspec
import pynvml

from services.nodeagent.adapters import gpus


def main(argv: list[str]) -> int:
    backend = gpus.NvmlGpus()
    try:
        if argv[0] == "discover":
            print(json.dumps([msgspec.structs.asdict(g) for g in backend.discover()]))
        elif argv[0] == "read":
            devices, processes = backend.read()
            print(
                json.dumps(
                    {
                        "devices": [d.__dict__ for d in devices],
                        "processes": [p.__dict__ for p in processes],
                    }
                )
            )
        elif argv[0] == "xids":
            backend.wait_xids(0.01)  # registers the event set: later XIDs are delivered
            inject(argv[1:])
            print(json.dumps(backend.wait_xids(0.5)))
        elif argv[0] == "inject":
            inject(argv[1:])
            print(json.dumps(argv[1:]))
    finally:
        backend.close()
    return 0


def inject(specs: list[str]) -> None:
    for spec in specs:
        index, xid = spec.split(":")
        assert pynvml.nvmlLib.vsliceMockInjectXid(int(index), int(xid)) == 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

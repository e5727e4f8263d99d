"""bench/soak.py --probe: in the coordinator child only, sample where its memory is, once a second (diagnostic).

Python imports `sitecustomize` at start from PYTHONPATH; soak.py puts this folder there for the coordinator alone
and names the output in SOAK_PROBE_OUT. Each line of it is JSON: the rounds logged so far; from /proc/self/status
VmRSS, RssAnon, RssFile (kB) and Threads; from glibc's mallinfo2 the heap's size (`arena`, bytes from sbrk/heaps),
the bytes in use in it (`uord`) and free in it (`ford`), mmapped blocks (`hblkhd`); the number of malloc arenas
(malloc_info's heaps); and every `SOAK_PROBE_GC_EVERY` rounds the live Python objects after a full collection,
with the 40 most common types. Not glibc (musl, macOS): only the /proc and gc figures. Never raises into the
coordinator.
"""

from __future__ import annotations

import os


def _start(out: str) -> None:
    import collections
    import ctypes
    import gc
    import json
    import tempfile
    import threading
    import time

    with open("/proc/self/cmdline", "rb") as fh:
        argv = fh.read().split(b"\0")
    log = os.path.join(argv[argv.index(b"--run-dir") + 1].decode(), "rounds.jsonl")
    gc_every = int(os.environ.get("SOAK_PROBE_GC_EVERY", "0"))

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    glibc = hasattr(libc, "mallinfo2") and hasattr(libc, "malloc_info")
    if glibc:
        libc.mallinfo2.restype = MallInfo2
        libc.fopen.restype = ctypes.c_void_p
    xml = os.path.join(tempfile.mkdtemp(prefix="soak-probe-"), "malloc_info.xml")

    def heap() -> dict[str, int]:
        if not glibc:
            return {}
        mi = libc.mallinfo2()
        fp = libc.fopen(xml.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        with open(xml) as fh:
            arenas = fh.read().count("<heap nr=")
        return {"arena": mi.arena, "uord": mi.uordblks, "ford": mi.fordblks, "hblkhd": mi.hblkhd, "arenas": arenas}

    def sample(rounds: int) -> dict[str, object]:
        rec: dict[str, object] = {"t": time.time(), "rounds": rounds}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                    rec[key] = int(value.split()[0])
        return {**rec, **heap()}

    def loop() -> None:
        last_gc = -1
        with open(out, "a") as f:
            while True:
                try:
                    with open(log, "rb") as fh:
                        rounds = fh.read().count(b"\n")
                except OSError:
                    rounds = 0
                rec = sample(rounds)
                if gc_every and rounds // gc_every != last_gc:
                    last_gc = rounds // gc_every
                    gc.collect()
                    objects = gc.get_objects()
                    rec["objects"] = len(objects)
                    rec["types"] = collections.Counter(type(o).__name__ for o in objects).most_common(40)
                    del objects
                f.write(json.dumps(rec) + "\n")
                f.flush()
                time.sleep(1.0)

    threading.Thread(target=loop, name="soak-probe", daemon=True).start()


if os.environ.get("SOAK_PROBE_OUT"):
    try:
        _start(os.environ["SOAK_PROBE_OUT"])
    except Exception as exc:  # a diagnostic: never stop the coordinator  # noqa: BLE001
        import sys

        print(f"soak probe: {exc}", file=sys.stderr)

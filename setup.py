"""Build script: only needed for the C extensions.

_nfqueue: our own NFQUEUE binding over libmnl. _espcore: the per-packet ESP work of AEAD SAs
(framing around the SA's `cryptography` AEAD object, the replay window, the engine's fast path).
"""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "nfq_ipsec._nfqueue",
            sources=["nfq_ipsec/_nfqueue.c"],
            libraries=["mnl"],  # Debian: libmnl-dev (+ python3-dev, gcc, linux-libc-dev)
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "nfq_ipsec._espcore",
            sources=["nfq_ipsec/_espcore.c", "nfq_ipsec/_replaywin.c"],
            depends=["nfq_ipsec/_espcore.h"],
            extra_compile_args=CFLAGS,
        ),
    ],
)

"""Build script: only needed for the C extension (our own NFQUEUE binding over libmnl)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nfq_ipsec._nfqueue",
            sources=["nfq_ipsec/_nfqueue.c"],
            libraries=["mnl"],  # Debian: libmnl-dev (+ python3-dev, gcc, linux-libc-dev)
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ],
)

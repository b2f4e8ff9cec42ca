"""Build script: only needed for the C extension (our own libnetfilter_queue binding)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nfq_ipsec._nfqueue",
            sources=["nfq_ipsec/_nfqueue.c"],
            libraries=["netfilter_queue", "nfnetlink", "mnl"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ],
)

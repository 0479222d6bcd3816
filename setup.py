"""The one compiled part of calltrace: collector._wire, its hot loops over the OTLP wire
format (storage rows, id checks, Redis stream entries, OTLP/JSON decoding). Optional:
where it cannot be built (no C compiler), calltrace runs each through its Python twin,
several times slower, with the same results."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "collector._wire",
            sources=["collector/_wire.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)

"""The one compiled part of calltrace: collector._rows, the storage exporters' row builder
read straight off the protobuf wire format. Optional: where it cannot be built (no C
compiler), calltrace runs the same rows through its Python loop, ~5x slower."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "collector._rows",
            sources=["collector/_rows.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)

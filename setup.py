"""The compiled parts, beside pyproject.toml (which holds everything else about the package).

`polarkvd.wire._probe`, the shared lookup table's probe in C (polarkvd/wire/_probe.c), is optional:
where no C compiler or Python headers are at hand the build goes on without it and engines probe
the table in Python (polarkvd/wire/lookup_table.py chooses at run time). So is
`polarkvd.wire._recvhash` (polarkvd/wire/_recvhash.c), the peer data path's receive-and-hash: without
it peer_wire.py receives and hashes in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "polarkvd.wire._probe",
            ["polarkvd/wire/_probe.c"],
            optional=True,
        ),
        Extension(
            "polarkvd.wire._recvhash",
            ["polarkvd/wire/_recvhash.c"],
            libraries=["dl"],
            optional=True,
        ),
    ]
)

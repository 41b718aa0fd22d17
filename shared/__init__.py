"""What the gateway and the API share (settings, subjects, capabilities, envelopes, auth).

`__version__` is natsgate's version, said here only: pyproject.toml reads it (setuptools'
dynamic version), the OpenAPI document and CHANGELOG.md's latest release follow it (tested).
"""

__version__ = "0.1.0"

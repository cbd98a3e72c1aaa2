"""harness: measure how faithfully 4-bit weight quantization (QLoRA family) preserves a model."""

# Part of every config's hash and tagged on every run: bump it whenever a change alters any number a run
# produces, so that no FINISHED run measured by older code is reused. tests/test_numerics.py pins it to a
# checksum of the numerical code.
NUMERICS_VERSION = "4"

from harness.progress import quiet_peer_logs  # noqa: E402  (after the constant other modules read)

quiet_peer_logs()  # before any module of the package imports transformers, in every process that imports it

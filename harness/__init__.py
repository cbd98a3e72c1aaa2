"""harness: measure how faithfully 4-bit weight quantization (QLoRA family) preserves a model."""

# Part of every config's hash and tagged on every run: bump it whenever a change alters any number a run
# produces, so that no FINISHED run measured by older code is reused. tests/test_numerics.py pins it to a
# checksum of the numerical code.
NUMERICS_VERSION = "4"

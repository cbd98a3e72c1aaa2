"""The one base of every error a user's input or machine state causes (a malformed experiment, a missing
asset, a port taken). Such an error says what is wrong and what to do in one line, or one line per problem;
the CLI prints it without a traceback. Anything else is a bug and keeps its traceback.

It imports nothing, so the quantization core can raise it and still depend on nothing else."""

from __future__ import annotations


class HarnessError(Exception):
    """A mistake of input or circumstance, said in one line per problem."""

"""What a GGUF file's header declares, read key by key without building the tokenizer's arrays (the ``gguf``
package's reader holds about 1.5 GB for Gemma's 262k-entry vocabulary)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from harness.errors import HarnessError


class GGUFHeaderError(HarnessError, ValueError):
    """A header that cannot be read: cut off, or not a GGUF."""


# metadata value types (gguf.GGUFValueType) by their struct format; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def file_type(path: Path) -> int | None:
    """``general.file_type`` from a GGUF's header; None when the header has none."""

    def read(fmt: str) -> Any:
        return struct.unpack(f"<{fmt}", file.read(struct.calcsize(fmt)))[0]

    def length() -> int:  # a string's length; a cut-off file promises more bytes than it holds
        n = read("Q")
        if file.tell() + n > size:
            raise ValueError(f"a field promises {n:,} bytes past the end of the file")
        return n

    def skip(kind: int) -> None:
        if kind == 8:
            file.seek(length(), 1)
        elif kind == 9:
            item, count = read("I"), read("Q")
            if item in _SCALARS:
                file.seek(count * struct.calcsize(_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    skip(item)
        else:
            file.seek(struct.calcsize(_SCALARS[kind]), 1)

    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            if file.read(4) != b"GGUF" or read("I") < 2:
                raise ValueError("not a GGUF v2+ file")
            _, n_keys = read("Q"), read("Q")
            for _ in range(n_keys):
                key, kind = file.read(length()).decode(), read("I")
                if key == "general.file_type" and kind in _SCALARS:
                    return int(read(_SCALARS[kind]))
                skip(kind)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise GGUFHeaderError(
            f"{path} cannot be read as a GGUF model ({exc}); download or copy it again"
        ) from exc
    return None

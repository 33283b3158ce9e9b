"""`loratool.validate`: every rule of the spec on a native adapter file, as findings."""

from __future__ import annotations

import os

from ..fsutil import maps_os_errors
from ..validation import Report, check_base, check_values, validate_header


@maps_os_errors("path", writes=False)
def validate(path, base=None, read_data: bool = True) -> Report:
    """Every rule of the spec on a native adapter file; with `base`, rules B001-B004 too.

    Args:
        path: the adapter file.
        base: a base model path (file or folder) or an opened io.base.BaseModel, or None.
        read_data: also read the factors for rules T006 and W003 (numpy, one tensor at a time; no torch).
    Returns:
        A Report; `report.errors` is empty when the file is valid.
    """
    rep = validate_header(path)
    if rep.adapter is None or rep.errors:
        return rep
    if read_data:
        from ..container import read_array

        class _OnDemand:
            """name -> tensor read when asked: validation holds one tensor at a time, whatever the file size."""

            def __init__(self, fd, header):
                self.fd, self.header = fd, header

            def get(self, name):
                info = self.header.tensors.get(name)
                return None if info is None else read_array(self.fd, self.header.data_start, info)

        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            rep.findings += check_values(_OnDemand(fd, rep.header), rep.adapter)
        finally:
            os.close(fd)
    if base is not None:
        from ..io.base import BaseModel, open_base

        b = base if isinstance(base, BaseModel) else open_base(base)
        try:
            rep.findings += check_base(rep.adapter, b)
        finally:
            if b is not base:
                b.close()
    return rep



__all__ = ["validate"]

"""A pickle reader that can only build containers, numbers, strings and numpy arrays.

RHD ships its annotations as a (Python 2) pickle. A plain ``pickle.load`` calls whatever
callable the file names, so loading a user-supplied pickle is running the user's code. Here
``find_class``, the one door through which a pickle reaches a callable, admits only what numpy
needs to rebuild arrays and scalars; anything else stops the load with a DataError naming the
file and the refused global, before it can be called. Builtin containers, numbers and strings
need no global at all.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from cmkg.errors import DataError

_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_numeric = np._core.numeric if hasattr(np, "_core") else np.core.numeric

# (module, name) -> the object it may resolve to; numpy 1.x pickles name numpy.core, 2.x numpy._core
ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3's protocol-2 writer stores bytes (array data) as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): codecs.encode,
    **{(f"numpy.{core}.multiarray", name): getattr(_multiarray, name)
       for core in ("core", "_core") for name in ("_reconstruct", "scalar")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer
       for core in ("core", "_core")},  # protocol 5
}


class _Restricted(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Python 2 str -> str, as numpy expects
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: refusing to unpickle the global {module}.{name}: only builtin "
                "containers, numbers, strings and numpy arrays are allowed (the file is not a "
                "plain annotation pickle; it may be corrupt or crafted to run code)") from None


def load(path: str | Path):
    """The object in the pickle file ``path``, built from allowed types only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as fh:
            return _Restricted(fh, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None

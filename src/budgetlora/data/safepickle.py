"""Unpickling files we did not write, without running their code.

A pickle names the functions it calls while loading (`find_class`), and plain `pickle.load` imports and calls
any of them: `os.system` included. The competition files are pickled `datasets.Dataset` objects (pyarrow tables
inside), so loading them needs only a short, fixed list of constructors. Anything else a pickle asks for is
refused before it is imported, and the load stops there.

The list was read off the shipped file (`pickletools` / a logging `find_class`), plus the few names a pickled
pandas DataFrame of text and integer columns needs.
"""
from __future__ import annotations

import pickle
from typing import BinaryIO

ALLOWED: dict[str, frozenset[str]] = {
    # datasets.Dataset: its info, features and in-memory arrow table wrappers
    "datasets.arrow_dataset": frozenset({"Dataset"}),
    "datasets.info": frozenset({"DatasetInfo"}),
    "datasets.splits": frozenset({"NamedSplit"}),
    "datasets.features.features": frozenset({"Features", "Value", "ClassLabel", "Sequence"}),
    "datasets.table": frozenset({"InMemoryTable", "ConcatenationTable"}),
    # pyarrow's reconstructors for schemas, arrays, batches and tables (pure data, no file or code access)
    "pyarrow.lib": frozenset({"type_for_alias", "schema", "field", "py_buffer", "chunked_array",
                              "_reconstruct_record_batch", "_reconstruct_table", "_restore_array"}),
    # numpy arrays (their dtype and raw bytes)
    "numpy": frozenset({"ndarray", "dtype"}),
    "numpy._core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy.core.multiarray": frozenset({"_reconstruct", "scalar"}),  # written by numpy < 2
    "numpy._core.numeric": frozenset({"_frombuffer"}),
    "numpy.core.numeric": frozenset({"_frombuffer"}),
    # a pandas DataFrame of text and label columns
    "pandas": frozenset({"DataFrame", "Index", "RangeIndex", "StringDtype"}),
    "pandas.arrays": frozenset({"ArrowStringArray"}),
    "pandas.core.frame": frozenset({"DataFrame"}),
    "pandas.core.internals.managers": frozenset({"BlockManager"}),
    "pandas._libs.internals": frozenset({"_unpickle_block"}),
    "pandas.core.indexes.base": frozenset({"_new_Index", "Index"}),
    "pandas.core.indexes.range": frozenset({"RangeIndex"}),
    "builtins": frozenset({"bytearray", "slice"}),
    "_codecs": frozenset({"encode"}),  # how protocol 2 stores bytes: encode(text, "latin1")
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""

    def __init__(self, module: str, name: str):
        super().__init__(f"refused to load {module}.{name}: only datasets/pyarrow/numpy/pandas table "
                         "constructors are allowed in a data pickle")
        self.module, self.name = module, name


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocols 0-2 spell builtins the Python 2 way
            module = "builtins"
        if name not in ALLOWED.get(module, ()):
            raise RefusedGlobal(module, name)
        return super().find_class(module, name)


def restricted_load(fh: BinaryIO):
    """`pickle.load`, but only the allow-listed globals may be imported or called."""
    return RestrictedUnpickler(fh).load()

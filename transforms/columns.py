"""Small helpers on Arrow columns that the feature readers (features, images, tokens) share.

Its own module, importing nothing of titans, so that ``features`` can call ``images`` and
``tokens`` while both of them import these helpers one way, without importing ``features``.
"""
from __future__ import annotations

import pyarrow as pa


def one_array(col):
    """A column as one Array; a one-chunk column without a copy (combine_chunks copies)."""
    if not isinstance(col, pa.ChunkedArray):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()

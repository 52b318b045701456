"""Item-keyed feature stores (Zarr or HDF5, picked by the path's suffix). Knows nothing about models."""
from stores.backends import StoreBusyError
from stores.store import (
    MISSING_REASONS, SCHEMA_VERSION, ArraySpec, FeatureStore, Ragged, StoreError, WriterConflictError,
    fingerprint, store_lock, writer_claim,
)

__all__ = [
    "ArraySpec", "FeatureStore", "MISSING_REASONS", "Ragged", "SCHEMA_VERSION", "StoreBusyError",
    "StoreError", "WriterConflictError", "fingerprint", "store_lock", "writer_claim",
]

"""Item-keyed feature stores (Zarr or HDF5, picked by the path's suffix). Knows nothing about models."""
from stores.errors import DamagedStoreError, StoreBusyError, StoreError, UnreadableStoreError, WriterConflictError
from stores.locks import store_lock, writer_claim
from stores.store import MISSING_REASONS, SCHEMA_VERSION, ArraySpec, FeatureStore, Ragged, fingerprint

__all__ = [
    "ArraySpec", "DamagedStoreError", "FeatureStore", "MISSING_REASONS", "Ragged", "SCHEMA_VERSION",
    "StoreBusyError", "StoreError", "UnreadableStoreError", "WriterConflictError", "fingerprint", "store_lock",
    "writer_claim",
]

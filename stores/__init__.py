"""Item-keyed feature stores (Zarr or HDF5, picked by the path's suffix). Knows nothing about models."""
from stores.errors import DamagedStoreError, StoreBusyError, StoreError, UnreadableStoreError, WriterConflictError
from stores.locks import clear_claims, file_lock, store_lock, writer_claim, writer_of
from stores.paths import is_url, local_path, partial_path, sidecar, store_location
from stores.arrays import MISSING_REASONS, ArraySpec, IdIndex, Ragged, fingerprint
from stores.layout import SCHEMA_VERSION
from stores.store import FeatureStore
from stores.upgrade import upgrade

__all__ = [
    "ArraySpec", "DamagedStoreError", "FeatureStore", "IdIndex", "MISSING_REASONS", "Ragged", "SCHEMA_VERSION",
    "StoreBusyError", "StoreError", "UnreadableStoreError", "WriterConflictError",
    "clear_claims", "file_lock", "fingerprint", "is_url", "local_path", "partial_path", "sidecar",
    "store_location", "store_lock", "upgrade", "writer_claim", "writer_of",
]

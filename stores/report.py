"""What a store says about itself: its arrays, items, blocks, bytes and provenance (`pipeline inspect`)."""
from __future__ import annotations

from functools import cached_property

from stores.errors import DamagedStoreError


class Report:
    """FeatureStore's description of itself (a part of it; see stores.store)."""

    @cached_property
    def checksummed(self) -> bool:
        """Whether every chunk of every array carries a checksum (schema 2; HDF5 stores of schema 1 too)."""
        return all(self.backend.checksummed(name) for name in self.array_names())

    def bytes_stored(self) -> int:
        """Bytes the store takes on disk (or on object storage: one listing of every object, slow there)."""
        return self.backend.nbytes_stored()

    def info(self) -> dict:
        arrays = {}
        for name in self.array_names():
            a = self.backend.array(name)
            arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
        report = {"path": str(self.path), "schema_version": self.schema_version, "checksummed": self.checksummed}
        try:
            counts = self._counts()
            complete = self._read_range("complete", 0, len(counts))
            report |= {
                "items": len(self),
                "planned_items": int(counts.sum()),
                "blocks": {"complete": int(complete.sum()), "total": len(complete)},
                "missing_inputs": int((self._read_range("missing", 0, len(counts) * self.block_rows) > 0).sum()),
            }
        except DamagedStoreError as err:  # still describe the rest; verify() says what is damaged
            report["damaged"] = str(err)
        return report | {"bytes_on_disk": self.bytes_stored(), "arrays": arrays, "provenance": self.provenance}

"""Data: dataset readers -> manifest, splits and leakage audit, image cache."""

# Importing the built-in readers registers them with READERS; the registry itself imports none of them.
from blastscan.data import readers  # noqa: F401
from blastscan.data.cache import CacheStats, ImageCache
from blastscan.data.manifest import LEUKEMIC, NORMAL, Manifest, read_manifest, write_manifest
from blastscan.data.registry import READERS, DatasetReader, ReaderOptions, reader_names
from blastscan.data.scan import ScanResult, scan

__all__ = [
    "LEUKEMIC",
    "NORMAL",
    "READERS",
    "CacheStats",
    "DatasetReader",
    "ImageCache",
    "Manifest",
    "ReaderOptions",
    "ScanResult",
    "read_manifest",
    "reader_names",
    "scan",
    "write_manifest",
]

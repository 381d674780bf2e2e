"""Data: dataset readers -> manifest, splits and leakage audit, image cache."""

from blastscan.data.cache import CacheStats, ImageCache
from blastscan.data.manifest import LEUKEMIC, NORMAL, Manifest, read_manifest, write_manifest
from blastscan.data.registry import DatasetReader, ReaderOptions, reader_names, register
from blastscan.data.scan import ScanResult, scan

__all__ = [
    "LEUKEMIC",
    "NORMAL",
    "CacheStats",
    "DatasetReader",
    "ImageCache",
    "Manifest",
    "ReaderOptions",
    "ScanResult",
    "read_manifest",
    "reader_names",
    "register",
    "scan",
    "write_manifest",
]

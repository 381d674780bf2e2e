"""Built-in dataset readers; importing this package registers each of them."""

from blastscan.data.readers import all_idb, bccd, c_nmc, deepapl, lab

__all__ = ["all_idb", "bccd", "c_nmc", "deepapl", "lab"]

"""Per-service virtual addresses: stable allocation (alloc, store), the labels that choose a data
path (labels), the kernel data path as nftables commands (rules: pure) and their execution
(kernel: I/O), and the loop that follows the registry (sync). Never touches Docker's tables."""

from stablenet.vips.sync import VipManager, remove_table

__all__ = ["VipManager", "remove_table"]

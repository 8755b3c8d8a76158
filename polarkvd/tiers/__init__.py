"""Storage tiers: each owns the bytes of one medium (DRAM arena, peers' memory, disk), never placement."""

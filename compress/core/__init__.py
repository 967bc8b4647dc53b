"""Leaves every stage uses: errors, the pass registry, neutral layers, disk writes, locks, limits."""

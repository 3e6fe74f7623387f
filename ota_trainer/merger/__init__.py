"""The merge: a recipe (:mod:`.recipe`), its inputs opened and checked once (:mod:`.inputs`), the methods
(:mod:`.methods`, one file each), FFG's thresholds (:mod:`.thresholds`), the runner and the report."""

//! Shuffled, resumable two-view batches from memory-mapped shards.

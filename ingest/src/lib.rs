//! Packs images into byol shards.

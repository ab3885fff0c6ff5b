//! BYOL augmentation: two asymmetric views per image (pure image ops, no IO).

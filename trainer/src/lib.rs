//! BYOL training in candle. The only crate that uses candle.

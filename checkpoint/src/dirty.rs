//! To be built (docs/LEVEL3.md).

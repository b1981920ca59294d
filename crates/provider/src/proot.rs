//! The PRoot provider (skeleton).

//! The Docker provider (skeleton).

//! The image catalog (skeleton).

//! Pure logic, no I/O.
//!
//! STUB: each helper adds its own modules here (one `pub mod` line each).
pub mod steps;

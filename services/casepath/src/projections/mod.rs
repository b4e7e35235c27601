//! casepath's read models: one projection per context stream, each writing
//! its own tables and its own rows of `cp_steps`.
//!
//! STUB: the ingest helper replaces this file.

use nrm_kernel::service::Kit;
use nrm_kernel::xborder::CountryCode;

/// Runs the projections of every context's stream while the service runs.
pub fn register(_kit: &mut Kit, _country: &CountryCode) {}

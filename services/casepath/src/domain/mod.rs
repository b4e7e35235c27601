//! Pure logic, no I/O.
//!
//! # Layout
//! - [`steps`]: each context's events as read-model rows and path steps.
//! - [`changes`]: what a commit changed, for the watchers.
//! - [`calendar`]: working days, public holidays, deadlines.
//! - [`order`]: the order of a timeline (own times, causation, ties).
//! - [`stage`]: where a person stands, and the time at each stage.
//! - [`suppress`]: small-cell suppression of published counts.

pub mod calendar;
pub mod changes;
pub mod order;
pub mod stage;
pub mod steps;
pub mod suppress;

//! The repatriation service: a return of a person found abroad to the home
//! country, as one history kept in two deployments.
//!
//! # Layout
//! - [`domain`]: the pure return aggregate, what crosses the border, request validation.
pub mod domain;

//! The identification service: police, prosecutors, border service, NGOs and
//! IOM report presumed victims of trafficking; screening against indicators;
//! the competent authority's formal decision, which opens the recovery and
//! reflection period.
//!
//! # Layout
//! - [`domain`]: the pure case aggregate and request validation.
//! - [`app`]: command handling and queries.
//! - [`grpc`]: the tonic service (mapping only).
//! - [`projections`]: the case list read model; who else may read a
//!   person's identifiers.
//! - [`homecoming`]: the cases that returns handed over from abroad open.
//! - [`config`]: settings from the environment.
//! - [`startup`]: building and running the service.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod homecoming;
pub mod projections;
pub mod startup;

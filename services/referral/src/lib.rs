//! The referral service: purpose-bound consents; referrals from one agency
//! to MSD, MoH, NGOs and IOM, answered within a time limit or escalated to
//! the national coordinator; services delivered; the individual
//! rehabilitation plan up to reintegration. It learns persons from the
//! identification stream and records the shelter service's answers.
//!
//! # Layout
//! - [`domain`]: the pure consent, referral and plan aggregates, and request validation.
//! - [`app`]: command handling and queries.
//! - [`grpc`]: the tonic service (mapping only).
//! - [`projections`]: the persons and inbox read models.
//! - [`reactions`]: the shelter answers reaction and the answer deadline timer.
//! - [`config`]: settings from the environment.
//! - [`startup`]: building and running the service.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod projections;
pub mod reactions;
pub mod startup;

//! casepath: the projections of every context's stream (identification,
//! referral, shelter, repatriation, the latter with what crossed from abroad)
//! into one path per person from the destination country to reintegration,
//! each agency's inbox with its deadlines, and the national figures. It
//! holds no identifiers (it has no key to open them): persons are
//! pseudonyms, everything else is coded. What a caller sees of a path is
//! decided part by part by the kernel's permission matrix
//! (`CasepathService/GetPath (<part>)`) and item by item by the caller's
//! standing to each record; every read of a path is audited.
//!
//! # Layout
//! - [`domain`]: pure logic: events to steps, the order of a timeline,
//!   stages, the working-day calendar, small-cell suppression.
//! - [`projections`]: the read models, one projection per stream.
//! - [`app`]: the queries (path, inbox, paths, statistics) and watching.
//! - [`grpc`]: the tonic service (mapping only).
//! - [`config`]: settings from the environment.
//! - [`startup`]: building and running the service.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod projections;
pub mod startup;

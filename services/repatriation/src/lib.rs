//! The repatriation service: the return of a person found abroad to the
//! home country, kept as one history in two deployments. In the destination
//! country IOM and the consulate open the return and record its steps
//! (consent, risk assessment, travel document, itinerary, escort,
//! departure, arrival, handover, or a halt before departure); from the
//! consent on, every step crosses to the home country sealed for its key
//! and limited to what the person consented to share. In the home country
//! the same return is built, read-only, from what crossed: announced before
//! departure to its IOM office, MSD and the coordinator. The identifiers
//! are sealed under a key of the return's own in both (crypto-shreddable)
//! and read, audited, only by whom they are due. Who may do what is the
//! kernel's permission matrix.
//!
//! # Layout
//! - [`domain`]: the pure return aggregate, what crosses the border, request validation.
//! - [`app`]: command handling, the crossing commits out and in, queries.
//! - [`grpc`]: the tonic service (mapping only).
//! - [`projections`]: the list read model.
//! - [`reactions`]: what comes in from each partner country.
//! - [`config`]: settings from the environment.
//! - [`startup`]: building and running the service.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod projections;
pub mod reactions;
pub mod startup;

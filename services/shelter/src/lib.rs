//! The shelter service: shelters and crisis centres publish bed capacity by
//! category and region; agencies hold a bed for a referral (never more holds
//! than beds), the shelter admits and discharges; holds nobody acts on
//! expire by themselves; an accepted referral with a shelter need gets a bed
//! held in its region, or a `NoBedAvailable` naming the nearest regions with
//! one. A shelter's address is sealed under a key of its own and shown only
//! to its operator and the coordinator.
//!
//! # Layout
//! - [`domain`]: the pure shelter aggregate, request validation, region centroids.
//! - [`app`]: command handling and queries.
//! - [`grpc`]: the tonic service (mapping only).
//! - [`projections`]: the free-capacity read model.
//! - [`reactions`]: the placement reaction to accepted referrals, and hold expiry.
//! - [`config`]: settings from the environment.
//! - [`startup`]: building and running the service.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod projections;
pub mod reactions;
pub mod startup;

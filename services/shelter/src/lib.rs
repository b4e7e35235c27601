//! The shelter service: shelters and crisis centres publish bed capacity by
//! category and region; the agency an accepted referral is addressed to
//! holds a bed for it (never more holds than beds, at most one open hold per
//! referral), the shelter admits and discharges; holds nobody acts on expire
//! by themselves, and a referral that is cancelled, closed, declined or
//! redirected releases its hold; an accepted referral with a shelter need
//! gets a bed held in its region, or a `NoBedAvailable` naming the nearest
//! regions with one. In the home country, a return announced from abroad
//! with a shelter need on arrival gets one bed held for the returns agency
//! (the home IOM office) in its arrival point's region for its arrival
//! window, released when the return halts. A shelter's address is sealed
//! under a key of its own and shown (audited) only to its operator, the
//! coordinator and an agency a bed is held for there; its operator sees who
//! is coming, never why. Who may do what is the kernel's permission matrix.
//!
//! # Layout
//! - [`domain`]: the pure shelter aggregate, request validation, region centroids.
//! - [`app`]: command handling and queries.
//! - [`grpc`]: the tonic service (mapping only).
//! - [`projections`]: the free-capacity read model.
//! - [`reactions`]: the referral stream (what the service knows of referrals,
//!   placement, auto-release), the repatriation stream (beds for arrivals
//!   from abroad), and hold expiry.
//! - [`config`]: settings from the environment.
//! - [`startup`]: building and running the service.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod projections;
pub mod reactions;
pub mod startup;

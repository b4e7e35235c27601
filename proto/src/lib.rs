//! Protobuf contracts of Köpür: one package per bounded context plus the
//! shared `nrm.common.v1`. Events are protobuf messages too; fields are never
//! renumbered.
//!
//! # Layout
//! - [`common::v1`]: sealed personal data, shared enums, command results;
//!   the operator's and the auditor's services every service serves.
//! - [`identification::v1`]: the identification service and its events.
//! - [`referral::v1`]: consents, referrals, the rehabilitation plan.
//! - [`shelter::v1`]: shelters, beds, holds, admissions.
//! - [`repatriation::v1`]: returns across borders and what crosses.
//! - [`casepath::v1`]: each agency's view of a person's path, inboxes, the
//!   national figures.
//! - [`FILE_DESCRIPTOR_SET`]: every file's descriptor, for gRPC reflection and
//!   for decoding events to JSON; each service's reflection lists only the
//!   services it serves.

#![allow(missing_docs, clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Encoded `google.protobuf.FileDescriptorSet` of every `.proto` file here.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nrm_descriptor.bin"));

/// `nrm.common.*`
pub mod common {
    /// `nrm.common.v1`
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/nrm.common.v1.rs"));
    }
}

/// `nrm.identification.*`
pub mod identification {
    /// `nrm.identification.v1`
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/nrm.identification.v1.rs"));
    }
}

/// `nrm.referral.*`
pub mod referral {
    /// `nrm.referral.v1`
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/nrm.referral.v1.rs"));
    }
}

/// `nrm.shelter.*`
pub mod shelter {
    /// `nrm.shelter.v1`
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/nrm.shelter.v1.rs"));
    }
}

/// `nrm.repatriation.*`
pub mod repatriation {
    /// `nrm.repatriation.v1`
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/nrm.repatriation.v1.rs"));
    }
}

/// `nrm.casepath.*`
pub mod casepath {
    /// `nrm.casepath.v1`
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/nrm.casepath.v1.rs"));
    }
}

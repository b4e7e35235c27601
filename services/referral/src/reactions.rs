//! What the service does on its own:
//! - [`ShelterAnswers`]: a reaction to the shelter stream: a bed held for a
//!   referral (`BedHeld`) or none free (`NoBedAvailable`) is recorded on the
//!   referral, in the transaction that moves the consumer's checkpoint; a
//!   redelivery is skipped by the checkpoint, and a hold already recorded is
//!   not recorded again.
//! - [`AnswerDue`]: the durable timer of a referral's answer deadline: an
//!   unanswered referral is marked overdue (escalated to the national
//!   coordinator) in the transaction that marks the timer fired.
//! - [`ConsentExpiry`]: the durable timer of a consent's expiry: the consent
//!   ends exactly as on withdrawal (its open referrals cancelled, sharing
//!   under it over) in the transaction that marks the timer fired.
//! - [`Homecomings`]: a reaction to the identification stream: a case opened
//!   for a person handed over from abroad (`CaseOpenedFromAbroad`) who
//!   agreed abroad to a reintegration referral gets its consent and its
//!   referral to the reintegration agency, once per case
//!   ([`Referrals::refer_home`]: its request key is the case's).

use nrm_kernel::ids::{ConsentId, ReferralId};
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::timers::{Timer, TimerHandler};
use nrm_proto::shelter::v1 as shelter;
use prost::Message as _;
use shelter::shelter_event::Event;
use sqlx::PgConnection;

use crate::app::{ANSWER_DUE, CONSENT_EXPIRES, Referrals};
use crate::domain::referral::Command;

/// Payload type of identification events.
const IDENTIFICATION_PAYLOAD: &str = "nrm.identification.v1.IdentificationEvent";

/// Payload type of shelter events.
const SHELTER_PAYLOAD: &str = "nrm.shelter.v1.ShelterEvent";

/// Records the shelter service's answers on referrals.
#[derive(Debug, Clone)]
pub struct ShelterAnswers {
    app: Referrals,
}

impl ShelterAnswers {
    /// The reaction, appending through `app`.
    #[must_use]
    pub fn new(app: Referrals) -> Self {
        Self { app }
    }
}

impl Projection for ShelterAnswers {
    const READ_MODEL: bool = false;

    fn name(&self) -> &'static str {
        "referral_shelter_answers"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        if delivery.commit.payload_type != SHELTER_PAYLOAD {
            return Ok(());
        }
        for committed in &delivery.commit.events {
            let Ok(event) = shelter::ShelterEvent::decode(committed.payload.as_slice()) else {
                anyhow::bail!("shelter event {} does not decode", committed.event_id);
            };
            let (referral_id, command) = match event.event {
                Some(Event::BedHeld(held)) => (
                    held.referral_id,
                    Command::RecordBedHold {
                        shelter_id: held.shelter_id,
                        hold_id: held.hold_id,
                        expires_at: held.expires_at,
                    },
                ),
                Some(Event::NoBedAvailable(none)) => (
                    none.referral_id,
                    Command::RecordNoBed {
                        nearest_regions_with_beds: none.nearest_regions_with_beds,
                    },
                ),
                _ => continue,
            };
            let Ok(referral_id) = ReferralId::parse("referral_id", &referral_id) else {
                tracing::warn!(event_id = %committed.event_id, "shelter answer without a referral ID; ignored");
                continue;
            };
            let recorded = self
                .app
                .record_placement(uow, referral_id, command, delivery.metadata.as_ref())
                .await?;
            tracing::info!(referral_id = %referral_id, recorded, "shelter answer applied");
        }
        Ok(())
    }

    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        // The effects are events on referrals: a replay finds them recorded and adds nothing.
        Ok(())
    }
}

/// Fires answer deadlines.
#[derive(Debug, Clone)]
pub struct AnswerDue {
    app: Referrals,
}

impl AnswerDue {
    /// The handler, appending through `app`.
    #[must_use]
    pub fn new(app: Referrals) -> Self {
        Self { app }
    }
}

impl TimerHandler for AnswerDue {
    fn kinds(&self) -> &'static [&'static str] {
        &[ANSWER_DUE]
    }

    async fn fire(&self, uow: &mut UnitOfWork, timer: &Timer) -> Result<(), anyhow::Error> {
        let Ok(referral_id) = ReferralId::parse("aggregate_id", &timer.aggregate_id) else {
            tracing::warn!(timer_id = %timer.id, "answer timer without a referral ID; dropped");
            return Ok(());
        };
        self.app.answer_due(uow, referral_id, timer.due_at).await?;
        Ok(())
    }
}

/// Ends consents at their expiry.
#[derive(Debug, Clone)]
pub struct ConsentExpiry {
    app: Referrals,
}

impl ConsentExpiry {
    /// The handler, appending through `app`.
    #[must_use]
    pub fn new(app: Referrals) -> Self {
        Self { app }
    }
}

impl TimerHandler for ConsentExpiry {
    fn kinds(&self) -> &'static [&'static str] {
        &[CONSENT_EXPIRES]
    }

    async fn fire(&self, uow: &mut UnitOfWork, timer: &Timer) -> Result<(), anyhow::Error> {
        let Ok(consent_id) = ConsentId::parse("aggregate_id", &timer.aggregate_id) else {
            tracing::warn!(timer_id = %timer.id, "expiry timer without a consent ID; dropped");
            return Ok(());
        };
        self.app.consent_expires(uow, consent_id, timer.due_at).await?;
        Ok(())
    }
}

/// Refers persons handed over from abroad for reintegration.
#[derive(Debug, Clone)]
pub struct Homecomings {
    app: Referrals,
}

impl Homecomings {
    /// The reaction, referring through `app`.
    #[must_use]
    pub fn new(app: Referrals) -> Self {
        Self { app }
    }
}

impl Projection for Homecomings {
    const READ_MODEL: bool = false;

    fn name(&self) -> &'static str {
        "referral_homecoming"
    }

    async fn apply(&self, _uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        use nrm_proto::identification::v1 as idpb;
        if delivery.commit.payload_type != IDENTIFICATION_PAYLOAD {
            return Ok(());
        }
        for committed in &delivery.commit.events {
            let Ok(event) = idpb::IdentificationEvent::decode(committed.payload.as_slice()) else {
                anyhow::bail!("identification event {} does not decode", committed.event_id);
            };
            let Some(idpb::identification_event::Event::CaseOpenedFromAbroad(opened)) = event.event else {
                continue;
            };
            let version = i64::try_from(committed.version)?;
            self.app
                .refer_home(&opened, version, delivery.metadata.as_ref())
                .await?;
        }
        Ok(())
    }

    /// Nothing to empty: the effects are events, and a replay finds each
    /// case's referral recorded under its request key.
    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}

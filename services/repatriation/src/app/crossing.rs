//! The crossing commits, both ways.
//!
//! **Out** (destination country): every command on an outgoing return from
//! the consent on appends, in its own unit of work, one commit to the stream
//! `xborder-{to}-{return_id}` (its version counts the crossing messages)
//! holding one `CrossBorderMessage`: the return as it stands after the step
//! ([`crate::domain::crossing::snapshot`]), sealed for the home country's
//! public key and bound to `nrm.xborder.v1|from|to|return_id|origin_version`.
//! The relay publishes it on [`Bus::outbound_subject`](nrm_kernel::bus::Bus::outbound_subject),
//! inside the domestic stream; the partner's outgoing stream sources it from
//! there. Its metadata names the service, not the officer: the step's agency
//! is inside the sealed snapshot.
//!
//! **In** (home country): the inbound reaction opens each message with this
//! country's key, checks it against its clear envelope and, in one unit of
//! work, appends to the incoming return's stream `ReturnAnnounced` (the
//! first) or `AnnouncedStepRecorded`, only when its origin version is above
//! the last one applied: later snapshots carry every earlier step, so an
//! older one arriving late (or twice) changes nothing. The identifiers are
//! sealed again under a key of the return's own here; a withdrawal of the
//! consent deletes that key (the shared identifiers are gone from every
//! copy). A message that does not decode or open is an error, named by its
//! IDs only: the runner retries it, then parks it.

use anyhow::{Context as _, anyhow, bail};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{PersonId, ReturnId};
use nrm_kernel::projection::Delivery;
use nrm_kernel::seal::DataKey;
use nrm_kernel::store::{EventMetadata, NewEvent, UnitOfWork};
use nrm_kernel::xborder::{self, CountryCode};
use nrm_proto::common::v1::{PersonalIdentifiers, SealedData};
use nrm_proto::repatriation::v1 as pb;
use pb::SharedField;
use prost::Message as _;

use super::{Returns, UNKNOWN_PARTNER, key_owner, to_new_events};
use crate::domain::{self, Command, Return};

/// Event type of the one event of a crossing commit.
pub const CROSSING_EVENT: &str = "CrossBorderMessage";
/// Prefix of the crossing streams (`xborder-{to}-{return_id}`).
pub const CROSSING_STREAM: &str = "xborder-";

/// Stream ID of the crossing messages of one return for country `to`.
#[must_use]
pub fn crossing_stream_id(to: &CountryCode, return_id: &str) -> String {
    format!("{CROSSING_STREAM}{to}-{return_id}")
}

/// Takes the transaction-scoped lock of a return's stream: the inbound
/// reaction decides on one return at a time (also across replicas).
async fn lock_return(uow: &mut UnitOfWork, return_id: ReturnId) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(domain::stream_id(return_id))
        .execute(uow.conn())
        .await?;
    Ok(())
}

impl Returns {
    /// Appends, in `uow`, the crossing commit of `after` (an outgoing return
    /// just moved on by a step; `steps` are all its steps).
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` `UNKNOWN_PARTNER` when the home country is no
    /// longer a partner; the store's errors.
    pub(crate) async fn cross_out(
        &self,
        uow: &mut UnitOfWork,
        after: &Return,
        steps: &[pb::Step],
        cause: &EventMetadata,
    ) -> Result<(), AppError> {
        let to = CountryCode::parse("citizenship", after.to_country())
            .map_err(|_| AppError::Internal("a return without a home country".into()))?;
        let Some(partner) = self.federation.partner(&to) else {
            return Err(AppError::precondition(
                UNKNOWN_PARTNER,
                "citizenship",
                "the home country is no longer a partner of this deployment: nothing can cross to it",
            ));
        };
        let personal =
            !after.consent_withdrawn() && (after.shares(SharedField::Identity) || after.shares(SharedField::Contact));
        let identifiers = if personal {
            self.identifiers_of(uow.conn(), after).await?
        } else {
            None
        };
        // What crosses is authenticated by this country's key pair (the
        // settings refuse partners without it).
        let own = self
            .federation
            .key
            .as_ref()
            .ok_or_else(|| AppError::Internal("no country key to seal what crosses with".into()))?;
        let snapshot = domain::crossing::snapshot(after, steps, identifiers.as_ref());
        let here = &self.federation.country;
        let aad = xborder::aad(here, &to, &snapshot.return_id, after.version);
        let message = pb::CrossBorderMessage {
            return_id: snapshot.return_id.clone(),
            from_country: here.as_str().to_owned(),
            to_country: to.as_str().to_owned(),
            origin_version: after.version,
            sealed: Some(xborder::seal(own, partner, &aad, &snapshot.encode_to_vec())),
        };
        let stream_id = crossing_stream_id(&to, &snapshot.return_id);
        let version: i64 = sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1")
            .bind(&stream_id)
            .fetch_one(uow.conn())
            .await?;
        let event = NewEvent {
            event_type: CROSSING_EVENT.to_owned(),
            schema_version: 1,
            payload: message.encode_to_vec(),
        };
        uow.append(
            &stream_id,
            u64::try_from(version).unwrap_or_default(),
            std::slice::from_ref(&event),
            &EventMetadata::system("repatriation.crossing", Some(cause)),
            &self.bus.outbound_subject(&to, &snapshot.return_id),
        )
        .await?;
        Ok(())
    }

    /// Applies, in `uow`, the crossing messages of one commit that came from
    /// partner `from` (the inbound reaction's handler).
    ///
    /// # Errors
    /// When a message is not addressed from `from` to this country, does
    /// not decode, does not open or does not match its envelope (named by
    /// its IDs only); the store's errors.
    pub async fn cross_in(&self, uow: &mut UnitOfWork, from: &CountryCode, delivery: &Delivery) -> anyhow::Result<()> {
        let commit = &delivery.commit;
        if !commit.stream_id.starts_with(CROSSING_STREAM) {
            return Ok(());
        }
        let here = &self.federation.country;
        for committed in &commit.events {
            let what = || format!("crossing message {} of commit {}", committed.event_id, commit.commit_id);
            if committed.event_type != CROSSING_EVENT {
                bail!("{}: event type is not {CROSSING_EVENT}", what());
            }
            let message = pb::CrossBorderMessage::decode(committed.payload.as_slice())
                .map_err(|_| anyhow!("{} does not decode", what()))?;
            if message.from_country != from.as_str() || message.to_country != here.as_str() {
                bail!("{} is not addressed from {from} to {here}", what());
            }
            let return_id = ReturnId::parse("return_id", &message.return_id)
                .map_err(|_| anyhow!("{} names no return ID", what()))?;
            if commit.stream_id != crossing_stream_id(here, &return_id.to_string()) {
                bail!("{} came on another return's stream", what());
            }
            let key = self.federation.key.as_ref().with_context(|| {
                format!(
                    "{}: this country has no private key (NRM_XBORDER__PRIVATE_KEY_FILE)",
                    what()
                )
            })?;
            let sealed = message
                .sealed
                .as_ref()
                .with_context(|| format!("{} carries nothing sealed", what()))?;
            let aad = xborder::aad(from, here, &message.return_id, message.origin_version);
            // The error names the key IDs at most, never what was sealed.
            let from_key = self
                .federation
                .partner(from)
                .with_context(|| format!("{}: {from} is not a partner of this deployment", what()))?;
            let plain =
                xborder::open(key, from_key, &aad, sealed).map_err(|e| anyhow!("{} does not open: {e}", what()))?;
            let mut snapshot = pb::CrossBorderReturn::decode(plain.as_slice())
                .map_err(|_| anyhow!("{}: what was sealed does not decode", what()))?;
            if snapshot.return_id != message.return_id
                || snapshot.origin_version != message.origin_version
                || snapshot.from_country != message.from_country
                || snapshot.to_country != message.to_country
            {
                bail!("{}: what was sealed does not match its envelope", what());
            }
            let identifiers = snapshot.identifiers.take();
            let cause = delivery.metadata.as_ref();
            self.announce(uow, from, return_id, snapshot, identifiers, cause)
                .await
                .map_err(|e| anyhow!("{}: {e}", what()))?;
        }
        Ok(())
    }

    /// Applies one opened snapshot to the incoming return `return_id`, once.
    async fn announce(
        &self,
        uow: &mut UnitOfWork,
        from: &CountryCode,
        return_id: ReturnId,
        snapshot: pb::CrossBorderReturn,
        identifiers: Option<PersonalIdentifiers>,
        cause: Option<&EventMetadata>,
    ) -> Result<(), AppError> {
        lock_return(uow, return_id).await?;
        let state = self.load_in(uow, return_id).await?.state;
        if !state.accepts_snapshot(snapshot.origin_version) {
            // Older than (or the same as) what was applied: nothing to do,
            // unless the return is not an incoming one at all.
            return match domain::decide(&state, &announcement(from, snapshot, None)) {
                Ok(_) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let withdrawn = snapshot.halt_reason == pb::HaltReason::ConsentWithdrawn as i32;
        let sealed = match identifiers {
            Some(identifiers) if !withdrawn => self.seal_here(uow, &state, &identifiers).await?,
            _ => None,
        };
        let events = domain::decide(&state, &announcement(from, snapshot, sealed))?;
        if events.is_empty() {
            return Ok(());
        }
        let metadata = EventMetadata::system("repatriation.inbound", cause);
        uow.append(
            &domain::stream_id(return_id),
            state.version,
            &to_new_events(&events),
            &metadata,
            &self.subject(&return_id.to_string()),
        )
        .await?;
        if withdrawn && let Some(previous) = &state.announced_identifiers {
            // The person withdrew: what was shared is erased here, in every copy.
            DataKey::shred(uow.conn(), key_owner(previous)?).await?;
        }
        Ok(())
    }

    /// Seals identifiers that crossed under the incoming return's key here
    /// (created with the first ones); `None` when that key was deleted.
    async fn seal_here(
        &self,
        uow: &mut UnitOfWork,
        state: &Return,
        identifiers: &PersonalIdentifiers,
    ) -> Result<Option<SealedData>, AppError> {
        let key = match &state.announced_identifiers {
            Some(previous) => self.key_of(uow.conn(), previous).await?,
            None => Some(DataKey::create(uow.conn(), &self.master, PersonId::new()).await?),
        };
        Ok(key.map(|key| key.seal(identifiers)))
    }
}

fn announcement(from: &CountryCode, snapshot: pb::CrossBorderReturn, identifiers: Option<SealedData>) -> Command {
    Command::Announce {
        from_country: from.as_str().to_owned(),
        snapshot: Box::new(snapshot),
        identifiers,
    }
}

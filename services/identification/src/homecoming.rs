//! Handovers from abroad: a reaction on the incoming stream of each partner
//! country (`{STREAM_PREFIX}_XB_IN_{FROM}`, which the repatriation service
//! sources from the partner's outgoing stream).
//!
//! Each crossing commit holds one `nrm.repatriation.v1.CrossBorderMessage`:
//! the return ID, the countries and the version in the clear, the return
//! itself (`CrossBorderReturn`, every step so far) sealed for this country.
//! [`Handovers`] opens it with this country's key, bound to its addressing
//! ([`xborder::aad`]), and acts on a return handed over only: it opens the
//! person's case, identified abroad ([`Identification::open_from_abroad`]),
//! once per return whatever the number of snapshots, redeliveries or
//! replays (the command's request key is the return's).
//!
//! A message that does not decode, does not open or whose sealed return
//! does not match its addressing is an error: the runner retries it and
//! then parks it for an operator (nothing of its content is logged). A
//! message addressed to another country than this one is passed over with a
//! warning (the link's filter should never let one through).

use anyhow::Context as _;
use chrono::Utc;
use nrm_kernel::error::AppError;
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::validate;
use nrm_kernel::xborder::{self, CountryCode, CountryKey, OUTBOUND_PAYLOAD_TYPE, PartnerKey};
use nrm_proto::repatriation::v1 as rp;
use prost::Message as _;
use sqlx::PgConnection;

use crate::app::Identification;
use crate::domain::abroad;

/// The reaction to the returns that cross from one partner country.
#[derive(Clone)]
pub struct Handovers {
    app: Identification,
    key: CountryKey,
    from: CountryCode,
    /// The partner's public key: only what it sealed opens here.
    from_key: PartnerKey,
    here: CountryCode,
    name: &'static str,
}

impl std::fmt::Debug for Handovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handovers")
            .field("from", &self.from)
            .field("here", &self.here)
            .finish_non_exhaustive()
    }
}

impl Handovers {
    /// The reaction to what crosses from `from` to `here`, opened with
    /// `key` (this country's), opening cases through `app`.
    #[must_use]
    pub fn new(app: Identification, key: CountryKey, from: (CountryCode, PartnerKey), here: CountryCode) -> Self {
        let (from, from_key) = from;
        // One checkpoint per partner; made once per partner at start.
        let name = format!("identification_homecoming_{from}").leak();
        Self {
            app,
            key,
            from,
            from_key,
            here,
            name,
        }
    }

    /// The return a crossing event carries, opened; `None` when it is
    /// addressed to another country.
    fn open(&self, payload: &[u8]) -> Result<Option<rp::CrossBorderReturn>, anyhow::Error> {
        let message = rp::CrossBorderMessage::decode(payload).context("a crossing message that does not decode")?;
        if !message.to_country.eq_ignore_ascii_case(self.here.as_str())
            || !message.from_country.eq_ignore_ascii_case(self.from.as_str())
        {
            tracing::warn!(
                return_id = %message.return_id,
                "a crossing message addressed to another country; passed over"
            );
            return Ok(None);
        }
        let sealed = message
            .sealed
            .as_ref()
            .context("a crossing message without its sealed return")?;
        let aad = xborder::aad(&self.from, &self.here, &message.return_id, message.origin_version);
        let plain = xborder::open(&self.key, &self.from_key, &aad, sealed)?;
        let ret = rp::CrossBorderReturn::decode(plain.as_slice()).context("a sealed return that does not decode")?;
        if ret.return_id != message.return_id || ret.origin_version != message.origin_version {
            anyhow::bail!("the sealed return does not match its message's return ID and version");
        }
        Ok(Some(ret))
    }
}

impl Projection for Handovers {
    const READ_MODEL: bool = false;

    fn name(&self) -> &'static str {
        self.name
    }

    async fn apply(&self, _uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        // The incoming stream holds crossing commits only: anything else is
        // an error to park and look at, never a handover passed over.
        if delivery.commit.payload_type != OUTBOUND_PAYLOAD_TYPE || !delivery.commit.stream_id.starts_with("xborder-") {
            anyhow::bail!(
                "commit {} on the incoming stream is not a crossing commit",
                delivery.commit.commit_id
            );
        }
        for committed in &delivery.commit.events {
            let Some(ret) = self.open(&committed.payload)? else {
                continue;
            };
            let now = validate::timestamp(Utc::now());
            let home = match abroad::handover(&ret, self.from.as_str(), self.app.here(), now) {
                Ok(Some(home)) => home,
                Ok(None) => continue,
                Err(refused) => return Err(refused.into()),
            };
            match self.app.open_from_abroad(home, delivery.metadata.as_ref()).await {
                Ok(_) => {}
                // Opened before and its person erased since: nothing to redo.
                Err(AppError::RequestIdReused) => {
                    tracing::info!(return_id = %ret.return_id, "handover acted on before (its case erased since)");
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// Nothing to empty: the cases are events, and a replay finds each
    /// return's case recorded under its request key.
    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}

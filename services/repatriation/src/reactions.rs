//! The crossing-in reaction: one runner per partner country on its incoming
//! stream ([`Source::inbound`](nrm_kernel::projection::Source::inbound)),
//! applying each crossing message once to the incoming return it announces
//! ([`Returns::cross_in`]). A reaction, not a read model: its effects are
//! events, which stay; a recreated stream is read again from its first
//! message and the origin-version rule keeps every effect single.

use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;

use crate::app::Returns;

/// What came from one partner country.
#[derive(Debug, Clone)]
pub struct Inbound {
    app: Returns,
    from: CountryCode,
    name: &'static str,
}

impl Inbound {
    /// The reaction to what `from` sends, named `repatriation_inbound_{from}`.
    #[must_use]
    pub fn new(app: Returns, from: CountryCode) -> Self {
        // One name per partner for the life of the process (its checkpoint key).
        let name: &'static str = Box::leak(format!("repatriation_inbound_{from}").into_boxed_str());
        Self { app, from, name }
    }
}

impl Projection for Inbound {
    const READ_MODEL: bool = false;

    fn name(&self) -> &'static str {
        self.name
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        self.app.cross_in(uow, &self.from, delivery).await
    }

    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}

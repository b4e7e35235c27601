//! Reading one shelter (from its events, so it is always current; with its
//! address, for its operator, the coordinator and an agency a bed is held
//! for there, every read audited as a read of the address), listing free
//! capacity (from the `free_capacity` read model, a few milliseconds behind,
//! answered from an index), and the arrivals a shelter expects (from the
//! open holds, written with the holds: who, which bed, when; never why; for
//! a person announced from abroad, the return's ID and expected arrival
//! from the arrivals reaction's record).

use chrono::{DateTime, Utc};
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::ShelterId;
use nrm_kernel::permissions::Standing;
use nrm_kernel::seal::DataKey;
use nrm_kernel::{audit, validate};
use nrm_proto::shelter::v1 as pb;
use sqlx::{Postgres, QueryBuilder, Row as _};
use tracing::field::{Empty, display};
use uuid::Uuid;

use super::{Shelters, not_found};
use crate::domain::{Shelter, parse};

impl Shelters {
    /// One shelter with its address, for its operator, the coordinator and
    /// an agency a bed is held for there (held or admitted). The read is
    /// audited as a read of the address before anything leaves the service.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty))]
    pub async fn get_shelter(&self, ctx: &CallContext, req: &pb::GetShelterRequest) -> Result<pb::Shelter, AppError> {
        let shelter_id = parse_shelter(ctx, &req.shelter_id)?;
        let shelter = self.load(shelter_id).await?;
        let Some(registered) = shelter.registered.clone() else {
            return Err(not_found(shelter_id));
        };
        let holders: Vec<&str> = shelter
            .holds
            .values()
            .filter(|h| h.status.takes_a_bed())
            .map(|h| h.holder_agency.as_str())
            .collect();
        ctx.check(&Standing {
            shelter_operator: Some(registered.operator_agency.as_str()),
            addressees: holders.clone(),
            ..Standing::default()
        })?;
        let why = if registered.operator_agency == ctx.agency() {
            "shelter operator"
        } else if holders.contains(&ctx.agency()) {
            "bed held"
        } else {
            "any"
        };
        let mut conn = self.store().pool().acquire().await?;
        audit::record(
            &mut conn,
            &ctx.caller.actor,
            "ReadShelterAddress",
            &shelter_id.to_string(),
            why,
        )
        .await?;
        drop(conn);
        let address = match &registered.address {
            Some(sealed) => match DataKey::load(self.store().pool(), &self.master, shelter_id).await? {
                // Never the sealing error's text: it could name what it opened.
                Some(key) => {
                    key.open(sealed)
                        .map_err(|_| AppError::Internal("the shelter's address does not open".into()))?
                        .address
                }
                // The shelter's key was deleted: the address is gone.
                None => String::new(),
            },
            None => String::new(),
        };
        Ok(view(shelter_id, &shelter, registered, address))
    }

    /// Who is coming to the shelter: its unexpired holds, earliest expiry
    /// first, each with the person's pseudonym (for a person announced from
    /// abroad: the return's ID, and when the person is expected), the bed
    /// category, the agency bringing the person and the arrival window. For
    /// the shelter's operator; audited.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty))]
    pub async fn list_arrivals(
        &self,
        ctx: &CallContext,
        req: &pb::ListArrivalsRequest,
    ) -> Result<pb::ListArrivalsResponse, AppError> {
        let shelter_id = parse_shelter(ctx, &req.shelter_id)?;
        let shelter = self.load(shelter_id).await?;
        if shelter.registered.is_none() {
            return Err(not_found(shelter_id));
        }
        ctx.check(&Standing {
            shelter_operator: Some(shelter.operator_agency()),
            ..Standing::default()
        })?;
        let mut conn = self.store().pool().acquire().await?;
        audit::record(
            &mut conn,
            &ctx.caller.actor,
            "ListArrivals",
            &shelter_id.to_string(),
            "arrivals",
        )
        .await?;
        let rows: Vec<ArrivalRow> = sqlx::query_as(
            "SELECT h.hold_id, r.person_id, h.category, h.holder_agency, h.held_at, h.expires_at,
                    p.return_id, p.arrival_at
             FROM open_holds h
             LEFT JOIN shelter_referrals r ON r.referral_id = h.referral_id
             LEFT JOIN placement_returns p ON p.hold_id = h.hold_id
             WHERE h.shelter_id = $1 AND h.status = 'held' AND h.expires_at > now()
             ORDER BY h.expires_at, h.hold_id",
        )
        .bind(shelter_id.as_uuid())
        .fetch_all(&mut *conn)
        .await?;
        let arrivals = rows
            .into_iter()
            .map(
                |(hold_id, person_id, category, holder_agency, held_at, expires_at, return_id, arrival_at)| {
                    pb::Arrival {
                        hold_id: hold_id.to_string(),
                        person_id: person_id.map(|p| p.to_string()).unwrap_or_default(),
                        category,
                        holder_agency,
                        held_at: Some(validate::timestamp(held_at)),
                        expires_at: Some(validate::timestamp(expires_at)),
                        return_id: return_id.map(|r| r.to_string()).unwrap_or_default(),
                        arrival_at: arrival_at.map(validate::timestamp),
                    }
                },
            )
            .collect();
        Ok(pb::ListArrivalsResponse { arrivals })
    }

    /// Beds by approved shelter and category, most free first; filtered by
    /// region and category when given.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed region or an unknown category.
    #[tracing::instrument(skip_all, fields(region = Empty, category = Empty))]
    pub async fn list_free_capacity(
        &self,
        ctx: &CallContext,
        req: &pb::ListFreeCapacityRequest,
    ) -> Result<pb::ListFreeCapacityResponse, AppError> {
        let mut v = Violations::new();
        let region = if req.region.trim().is_empty() {
            Some(String::new())
        } else {
            v.check(parse::region("region", &req.region))
        };
        let category = v.check(parse::category_filter("category", req.category));
        let (region, category) = v.finish(|| (region.unwrap_or_default(), category.flatten()))?;
        ctx.check(&Standing::default())?;
        let span = tracing::Span::current();
        span.record("region", region.as_str());
        if let Some(category) = category {
            span.record("category", category.as_str_name());
        }
        // Only the filters asked for, so that each shape of the query uses its index.
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT shelter_id, region, category, free FROM free_capacity WHERE approved");
        if !region.is_empty() {
            q.push(" AND region = ").push_bind(region);
        }
        if let Some(category) = category {
            q.push(" AND category = ").push_bind(category as i32);
        }
        q.push(" ORDER BY free DESC, region, shelter_id, category");
        let rows = q.build().fetch_all(self.store().pool()).await?;
        let entries = rows
            .iter()
            .map(|row| pb::FreeCapacity {
                shelter_id: row.get::<Uuid, _>("shelter_id").to_string(),
                region: row.get("region"),
                category: row.get("category"),
                free: u32::try_from(row.get::<i32, _>("free")).unwrap_or(0),
            })
            .collect();
        Ok(pb::ListFreeCapacityResponse { entries })
    }
}

/// An open hold as `ListArrivals` reads it: hold, person, category, holder,
/// held at, expires at; for an arrival from abroad, the return and when the
/// person is expected.
type ArrivalRow = (
    Uuid,
    Option<Uuid>,
    i32,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<Uuid>,
    Option<DateTime<Utc>>,
);

/// The shelter ID of a query, parsed and recorded (span, audit of a refusal).
fn parse_shelter(ctx: &CallContext, text: &str) -> Result<ShelterId, AppError> {
    let mut v = Violations::new();
    let shelter_id = v.check(ShelterId::parse("shelter_id", text));
    let shelter_id = v.finish(|| shelter_id.unwrap_or_default())?;
    tracing::Span::current().record("shelter_id", display(shelter_id));
    ctx.concerns(shelter_id);
    Ok(shelter_id)
}

/// The shelter as the caller sees it.
fn view(shelter_id: ShelterId, shelter: &Shelter, registered: pb::ShelterRegistered, address: String) -> pb::Shelter {
    let capacity: Vec<pb::BedCapacity> = shelter
        .capacity
        .iter()
        .map(|(&category, &beds)| pb::BedCapacity { category, beds })
        .collect();
    let free = capacity
        .iter()
        .map(|c| pb::BedCapacity {
            category: c.category,
            beds: shelter.free(c.category),
        })
        .collect();
    pb::Shelter {
        shelter_id: shelter_id.to_string(),
        code: registered.code,
        region: registered.region,
        capacity,
        free,
        services: registered.services,
        wheelchair_accessible: registered.wheelchair_accessible,
        operator_agency: registered.operator_agency,
        version: shelter.version,
        address,
    }
}

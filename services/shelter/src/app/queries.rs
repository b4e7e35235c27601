//! Reading one shelter (from its events, so it is always current; the address
//! opened only for its operator and the coordinator, and every read audited)
//! and listing free capacity (from the `free_capacity` read model, a few
//! milliseconds behind, answered from an index).

use nrm_kernel::audit;
use nrm_kernel::auth::Role;
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::ShelterId;
use nrm_kernel::seal::DataKey;
use nrm_proto::shelter::v1 as pb;
use sqlx::{Postgres, QueryBuilder, Row as _};
use uuid::Uuid;

use super::{Shelters, not_found};
use crate::domain::{Shelter, parse};

impl Shelters {
    /// One shelter as the caller may see it: the address only for the
    /// operating agency and the coordinator.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`.
    #[tracing::instrument(skip_all, fields(shelter_id = %req.shelter_id))]
    pub async fn get_shelter(&self, ctx: &CallContext, req: &pb::GetShelterRequest) -> Result<pb::Shelter, AppError> {
        let mut v = Violations::new();
        let shelter_id = v.check(ShelterId::parse("shelter_id", &req.shelter_id));
        let shelter_id = v.finish(|| shelter_id.unwrap_or_default())?;
        let shelter = self.load(shelter_id).await?;
        let Some(registered) = shelter.registered.clone() else {
            return Err(not_found(shelter_id));
        };
        let may_see_address =
            registered.operator_agency == ctx.caller.actor.agency || ctx.caller.role == Role::Coordinator;
        // The read is recorded before anything leaves the service.
        let mut conn = self.store().pool().acquire().await?;
        audit::record(
            &mut conn,
            &ctx.caller.actor,
            "GetShelter",
            &shelter_id.to_string(),
            if may_see_address { "address" } else { "capacity" },
        )
        .await?;
        drop(conn);
        let address = match (&registered.address, may_see_address) {
            (Some(sealed), true) => {
                let key = DataKey::load(self.store().pool(), &self.master, shelter_id).await?;
                match key {
                    Some(key) => key.open(sealed).map_err(|e| AppError::Internal(e.to_string()))?.address,
                    // The shelter's key was deleted: the address is gone.
                    None => String::new(),
                }
            }
            _ => String::new(),
        };
        Ok(view(shelter_id, &shelter, registered, address))
    }

    /// Beds by shelter and category, most free first; filtered by region and
    /// category when given.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed region or an unknown category.
    #[tracing::instrument(skip_all, fields(region = %req.region, category = req.category))]
    pub async fn list_free_capacity(
        &self,
        _ctx: &CallContext,
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
        // Only the filters asked for, so that each shape of the query uses its index.
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT shelter_id, region, category, free FROM free_capacity WHERE true");
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

//! The shelter: a pure aggregate.
//!
//! `decide(&shelter, &command)` answers with the events the command causes
//! (or why it cannot happen); `evolve(shelter, &event)` folds an event into
//! the state. No clock, database or network in here: the time, the new hold's
//! ID and its expiry arrive in the command.
//!
//! The rule that matters most: a bed is held only while one is free, where
//! `free(category) = capacity − held − admitted`. The application appends
//! with the expected stream version, so two callers deciding on the same
//! state cannot both take the last bed.
//!
//! # Layout
//! - this module: state, commands, `decide`, `evolve`, domain errors.
//! - [`parse`]: validating constructors from requests, naming offending fields.
//! - [`regions`]: region centroids and the nearest regions with a free bed.
//! - [`arrivals`]: what a return announced from abroad asks of a bed: the
//!   region of its arrival point, the category of its profile, the window.

pub mod arrivals;
pub mod parse;
pub mod regions;

use std::collections::BTreeMap;

use nrm_kernel::ids::{HoldId, ReferralId, ReturnId, ShelterId};
use nrm_proto::shelter::v1 as pb;
use pb::shelter_event::Event;
use prost_types::Timestamp;

/// Stable name of the aggregate, used in stream IDs and subjects.
pub const NAME: &str = "shelter";
/// Name of the placement streams (one per referral the reaction found no bed for).
pub const PLACEMENT: &str = "placement";
/// Name of the arrival placement streams (one per announced return the
/// arrivals reaction found no bed for).
pub const ARRIVAL: &str = "arrival";

/// Stream ID of a shelter.
#[must_use]
pub fn stream_id(shelter_id: ShelterId) -> String {
    format!("{NAME}-{shelter_id}")
}

/// Stream ID of a referral's placement attempts.
#[must_use]
pub fn placement_stream_id(referral_id: ReferralId) -> String {
    format!("{PLACEMENT}-{referral_id}")
}

/// Stream ID of the placement attempt for a return announced from abroad.
#[must_use]
pub fn arrival_stream_id(return_id: ReturnId) -> String {
    format!("{ARRIVAL}-{return_id}")
}

/// Whom a bed is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldFor {
    /// An accepted referral: at most one bed at this shelter (and, by the
    /// application's `open_holds`, anywhere) while its hold takes one.
    Referral(ReferralId),
    /// A person announced from abroad (a return with a shelter need). The
    /// hold's events name no referral; which return it is for is the
    /// arrivals reaction's to keep (one hold per return, ever), beside the
    /// hold in the same transaction.
    Arrival,
}

/// Where a hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStatus {
    /// A bed is kept for the referral until the hold expires.
    Held,
    /// The person was admitted: the bed is occupied.
    Admitted,
    /// The person left: the bed is free again.
    Discharged,
    /// Released before it expired: the bed is free again.
    Released,
    /// Expired without an admission: the bed is free again.
    Expired,
}

impl HoldStatus {
    /// Whether the hold takes a bed.
    #[must_use]
    pub const fn takes_a_bed(self) -> bool {
        matches!(self, HoldStatus::Held | HoldStatus::Admitted)
    }
}

/// One hold, as folded from its events.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    /// Bed category (`pb::BedCategory` value).
    pub category: i32,
    /// The referral the bed is for ("" for a person arriving from abroad).
    pub referral_id: String,
    /// Where it stands.
    pub status: HoldStatus,
    /// When it expires unless the person is admitted.
    pub expires_at: Timestamp,
    /// The agency the bed is held for.
    pub holder_agency: String,
}

/// The state of one shelter, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shelter {
    /// Number of events so far (0: the shelter does not exist).
    pub version: u64,
    /// The registration, as recorded (the address sealed).
    pub registered: Option<pb::ShelterRegistered>,
    /// Beds per category (`pb::BedCategory` value).
    pub capacity: BTreeMap<i32, u32>,
    /// Every hold, by hold ID.
    pub holds: BTreeMap<String, Hold>,
    /// Whether the coordinator approved the shelter (placement and holds
    /// use approved shelters only).
    pub approved: bool,
}

impl Shelter {
    /// The shelter's ID as recorded ("" before registration).
    #[must_use]
    pub fn shelter_id(&self) -> &str {
        self.registered.as_ref().map_or("", |r| r.shelter_id.as_str())
    }

    /// The shelter's region ("" before registration).
    #[must_use]
    pub fn region(&self) -> &str {
        self.registered.as_ref().map_or("", |r| r.region.as_str())
    }

    /// The agency that runs the shelter ("" before registration).
    #[must_use]
    pub fn operator_agency(&self) -> &str {
        self.registered.as_ref().map_or("", |r| r.operator_agency.as_str())
    }

    /// Beds of `category` held or occupied.
    #[must_use]
    pub fn occupied(&self, category: i32) -> u32 {
        let taken = self
            .holds
            .values()
            .filter(|h| h.category == category && h.status.takes_a_bed())
            .count();
        u32::try_from(taken).unwrap_or(u32::MAX)
    }

    /// Beds of `category` neither held nor occupied.
    #[must_use]
    pub fn free(&self, category: i32) -> u32 {
        self.capacity
            .get(&category)
            .copied()
            .unwrap_or(0)
            .saturating_sub(self.occupied(category))
    }

    /// The hold that takes a bed for `referral_id`, if any.
    #[must_use]
    pub fn active_hold_for(&self, referral_id: ReferralId) -> Option<(&str, &Hold)> {
        let referral_id = referral_id.to_string();
        self.holds
            .iter()
            .find(|(_, h)| h.referral_id == referral_id && h.status.takes_a_bed())
            .map(|(id, h)| (id.as_str(), h))
    }
}

/// What a caller (or the service itself) asks of a shelter.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Register the shelter. The application seals the address first.
    Register {
        /// The registration with the sealed address.
        registered: Box<pb::ShelterRegistered>,
    },
    /// The coordinator approves the shelter.
    Approve,
    /// Set the beds of one category.
    ChangeCapacity {
        /// The category.
        category: pb::BedCategory,
        /// The new number of beds.
        beds: u32,
    },
    /// Hold a bed for a referral or a person arriving from abroad.
    HoldBed {
        /// The new hold's ID.
        hold_id: HoldId,
        /// The category.
        category: pb::BedCategory,
        /// Whom the bed is for.
        held_for: HeldFor,
        /// When the hold expires unless the person is admitted.
        expires_at: Timestamp,
        /// The agency the bed is held for.
        holder_agency: String,
    },
    /// Release a hold before it expires.
    ReleaseHold {
        /// The hold.
        hold_id: HoldId,
    },
    /// Admit the person a hold was for.
    Admit {
        /// The hold.
        hold_id: HoldId,
        /// Now.
        now: Timestamp,
    },
    /// Discharge an admitted person.
    Discharge {
        /// The hold.
        hold_id: HoldId,
        /// Now.
        now: Timestamp,
    },
    /// The hold's expiry timer fired.
    ExpireHold {
        /// The hold.
        hold_id: HoldId,
    },
}

/// Why a command cannot happen in the shelter's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The shelter does not exist.
    #[error("the shelter does not exist")]
    NotFound,
    /// A registration for this shelter ID exists already.
    #[error("the shelter was already registered")]
    AlreadyRegistered,
    /// Fewer beds than are held or occupied.
    #[error("the capacity cannot go below the beds held or occupied ({occupied})")]
    CapacityBelowOccupancy {
        /// Beds of the category held or occupied.
        occupied: u32,
    },
    /// No bed of the category is free.
    #[error("no bed of the category is free")]
    NoBedFree,
    /// The shelter is not approved: no bed is held there.
    #[error("the shelter is not approved by the coordinator")]
    NotApproved,
    /// The shelter was approved already.
    #[error("the shelter was already approved")]
    AlreadyApproved,
    /// The referral already holds (or occupies) a bed here.
    #[error("the referral already holds a bed")]
    AlreadyHeld,
    /// Releasing a hold that is not held.
    #[error("the hold is not held (unknown, admitted, released or expired)")]
    NotHeld,
    /// Admitting without a held, unexpired hold.
    #[error("admission needs a held, unexpired hold")]
    AdmitWithoutHold,
    /// Discharging someone not admitted.
    #[error("only an admitted person can be discharged")]
    NotAdmitted,
}

impl DomainError {
    /// Stable code of the rule.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            DomainError::NotFound => "NOT_FOUND",
            DomainError::AlreadyRegistered => "ALREADY_REGISTERED",
            DomainError::CapacityBelowOccupancy { .. } => "CAPACITY_BELOW_OCCUPANCY",
            DomainError::NoBedFree => "NO_BED_FREE",
            DomainError::NotApproved => "SHELTER_NOT_APPROVED",
            DomainError::AlreadyApproved => "ALREADY_APPROVED",
            DomainError::AlreadyHeld => "ALREADY_HELD",
            DomainError::NotHeld => "NOT_HELD",
            DomainError::AdmitWithoutHold => "ADMIT_WITHOUT_HOLD",
            DomainError::NotAdmitted => "NOT_ADMITTED",
        }
    }
}

fn before(a: &Timestamp, b: &Timestamp) -> bool {
    (a.seconds, a.nanos) < (b.seconds, b.nanos)
}

/// The events `command` causes in `shelter`.
///
/// # Errors
/// A [`DomainError`] when the command does not fit the shelter's state.
pub fn decide(shelter: &Shelter, command: &Command) -> Result<Vec<Event>, DomainError> {
    let shelter_id = shelter.shelter_id().to_owned();
    let hold = |hold_id: &HoldId| shelter.holds.get(&hold_id.to_string());
    match command {
        Command::Register { registered } => {
            if shelter.registered.is_some() {
                return Err(DomainError::AlreadyRegistered);
            }
            Ok(vec![Event::ShelterRegistered((**registered).clone())])
        }
        _ if shelter.registered.is_none() => Err(DomainError::NotFound),
        Command::Approve => {
            if shelter.approved {
                return Err(DomainError::AlreadyApproved);
            }
            Ok(vec![Event::ShelterApproved(pb::ShelterApproved { shelter_id })])
        }
        Command::ChangeCapacity { category, beds } => {
            let occupied = shelter.occupied(*category as i32);
            if *beds < occupied {
                return Err(DomainError::CapacityBelowOccupancy { occupied });
            }
            Ok(vec![Event::CapacityChanged(pb::CapacityChanged {
                shelter_id,
                category: *category as i32,
                beds: *beds,
            })])
        }
        Command::HoldBed {
            hold_id,
            category,
            held_for,
            expires_at,
            holder_agency,
        } => {
            if !shelter.approved {
                return Err(DomainError::NotApproved);
            }
            let referral_id = match held_for {
                HeldFor::Referral(referral_id) => {
                    if shelter.active_hold_for(*referral_id).is_some() {
                        return Err(DomainError::AlreadyHeld);
                    }
                    referral_id.to_string()
                }
                HeldFor::Arrival => String::new(),
            };
            if shelter.free(*category as i32) == 0 {
                return Err(DomainError::NoBedFree);
            }
            Ok(vec![Event::BedHeld(pb::BedHeld {
                shelter_id,
                hold_id: hold_id.to_string(),
                category: *category as i32,
                referral_id,
                expires_at: Some(*expires_at),
                region: shelter.region().to_owned(),
                holder_agency: holder_agency.clone(),
            })])
        }
        Command::ReleaseHold { hold_id } => match hold(hold_id) {
            Some(h) if h.status == HoldStatus::Held => Ok(vec![Event::HoldReleased(pb::HoldReleased {
                shelter_id,
                hold_id: hold_id.to_string(),
                referral_id: h.referral_id.clone(),
            })]),
            _ => Err(DomainError::NotHeld),
        },
        Command::Admit { hold_id, now } => match hold(hold_id) {
            Some(h) if h.status == HoldStatus::Held && before(now, &h.expires_at) => {
                Ok(vec![Event::PersonAdmitted(pb::PersonAdmitted {
                    shelter_id,
                    hold_id: hold_id.to_string(),
                    referral_id: h.referral_id.clone(),
                    admitted_at: Some(*now),
                })])
            }
            _ => Err(DomainError::AdmitWithoutHold),
        },
        Command::Discharge { hold_id, now } => match hold(hold_id) {
            Some(h) if h.status == HoldStatus::Admitted => Ok(vec![Event::PersonDischarged(pb::PersonDischarged {
                shelter_id,
                hold_id: hold_id.to_string(),
                referral_id: h.referral_id.clone(),
                discharged_at: Some(*now),
            })]),
            _ => Err(DomainError::NotAdmitted),
        },
        // A timer that fires after a release or an admission changes nothing.
        Command::ExpireHold { hold_id } => match hold(hold_id) {
            Some(h) if h.status == HoldStatus::Held => Ok(vec![Event::HoldExpired(pb::HoldExpired {
                shelter_id,
                hold_id: hold_id.to_string(),
                referral_id: h.referral_id.clone(),
            })]),
            _ => Ok(Vec::new()),
        },
    }
}

fn set_status(shelter: &mut Shelter, hold_id: &str, status: HoldStatus) {
    if let Some(hold) = shelter.holds.get_mut(hold_id) {
        hold.status = status;
    }
}

/// The shelter after `event`.
#[must_use]
pub fn evolve(mut shelter: Shelter, event: &Event) -> Shelter {
    shelter.version += 1;
    match event {
        Event::ShelterRegistered(registered) => {
            shelter.capacity = registered.capacity.iter().map(|c| (c.category, c.beds)).collect();
            shelter.registered = Some(registered.clone());
        }
        Event::ShelterApproved(_) => shelter.approved = true,
        Event::CapacityChanged(changed) => {
            shelter.capacity.insert(changed.category, changed.beds);
        }
        Event::BedHeld(held) => {
            shelter.holds.insert(
                held.hold_id.clone(),
                Hold {
                    category: held.category,
                    referral_id: held.referral_id.clone(),
                    status: HoldStatus::Held,
                    expires_at: held.expires_at.unwrap_or_default(),
                    holder_agency: held.holder_agency.clone(),
                },
            );
        }
        Event::HoldReleased(e) => set_status(&mut shelter, &e.hold_id, HoldStatus::Released),
        Event::HoldExpired(e) => set_status(&mut shelter, &e.hold_id, HoldStatus::Expired),
        Event::PersonAdmitted(e) => set_status(&mut shelter, &e.hold_id, HoldStatus::Admitted),
        Event::PersonDischarged(e) => set_status(&mut shelter, &e.hold_id, HoldStatus::Discharged),
        // Placement events live on their own streams, never on a shelter's.
        Event::NoBedAvailable(_) => {}
    }
    shelter
}

/// Name of an event's variant, as stored and as sent in headers.
#[must_use]
pub fn event_type(event: &Event) -> &'static str {
    match event {
        Event::ShelterRegistered(_) => "ShelterRegistered",
        Event::ShelterApproved(_) => "ShelterApproved",
        Event::CapacityChanged(_) => "CapacityChanged",
        Event::BedHeld(_) => "BedHeld",
        Event::HoldReleased(_) => "HoldReleased",
        Event::HoldExpired(_) => "HoldExpired",
        Event::PersonAdmitted(_) => "PersonAdmitted",
        Event::PersonDischarged(_) => "PersonDischarged",
        Event::NoBedAvailable(_) => "NoBedAvailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::BedCategory::{Children, Women};

    const NOW: Timestamp = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };
    const LATER: Timestamp = Timestamp {
        seconds: 1_790_086_400,
        nanos: 0,
    };

    fn registered(women: u32) -> Event {
        Event::ShelterRegistered(pb::ShelterRegistered {
            shelter_id: "s1".into(),
            code: "OSH-CC-2".into(),
            region: "KG-O".into(),
            capacity: vec![pb::BedCapacity {
                category: Women as i32,
                beds: women,
            }],
            operator_agency: "kg-ngo-1".into(),
            ..Default::default()
        })
    }

    /// The shelter after `events`, approved by the coordinator after its registration.
    fn given(events: &[Event]) -> Shelter {
        let mut shelter = events.iter().fold(Shelter::default(), evolve);
        shelter.approved = true;
        shelter
    }

    #[test]
    fn a_bed_is_held_only_at_an_approved_shelter_and_approval_happens_once() {
        let unapproved = [registered(2)].iter().fold(Shelter::default(), evolve);
        assert_eq!(
            decide(&unapproved, &hold(HoldId::new(), ReferralId::new())),
            Err(DomainError::NotApproved)
        );
        let approved = then(&unapproved, &Command::Approve);
        assert!(matches!(&approved, Event::ShelterApproved(a) if a.shelter_id == "s1"));
        let shelter = evolve(unapproved, &approved);
        assert!(shelter.approved);
        assert!(matches!(
            then(&shelter, &hold(HoldId::new(), ReferralId::new())),
            Event::BedHeld(_)
        ));
        assert_eq!(decide(&shelter, &Command::Approve), Err(DomainError::AlreadyApproved));
        assert_eq!(
            decide(&Shelter::default(), &Command::Approve),
            Err(DomainError::NotFound)
        );
    }

    fn hold(hold_id: HoldId, referral_id: ReferralId) -> Command {
        Command::HoldBed {
            hold_id,
            category: Women,
            held_for: HeldFor::Referral(referral_id),
            expires_at: LATER,
            holder_agency: "kg-msd".into(),
        }
    }

    fn then(shelter: &Shelter, command: &Command) -> Event {
        let mut events = decide(shelter, command).expect("the command succeeds");
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    #[test]
    fn a_bed_is_held_while_one_is_free_and_never_beyond_capacity() {
        let mut history = vec![registered(2)];
        for _ in 0..2 {
            let event = then(&given(&history), &hold(HoldId::new(), ReferralId::new()));
            assert!(matches!(&event, Event::BedHeld(h) if h.region == "KG-O"));
            history.push(event);
        }
        let full = given(&history);
        assert_eq!(full.free(Women as i32), 0);
        assert_eq!(
            decide(&full, &hold(HoldId::new(), ReferralId::new())),
            Err(DomainError::NoBedFree)
        );
        // A category the shelter has no beds of is never free.
        let children = Command::HoldBed {
            hold_id: HoldId::new(),
            category: Children,
            held_for: HeldFor::Referral(ReferralId::new()),
            expires_at: LATER,
            holder_agency: "kg-msd".into(),
        };
        assert_eq!(decide(&given(&[registered(2)]), &children), Err(DomainError::NoBedFree));
    }

    #[test]
    fn one_referral_holds_one_bed_per_shelter() {
        let referral = ReferralId::new();
        let held = then(&given(&[registered(5)]), &hold(HoldId::new(), referral));
        let shelter = given(&[registered(5), held]);
        assert_eq!(
            decide(&shelter, &hold(HoldId::new(), referral)),
            Err(DomainError::AlreadyHeld)
        );
    }

    #[test]
    fn a_bed_held_for_an_arrival_names_no_referral_and_counts_like_any_other() {
        let arrival = |hold_id| Command::HoldBed {
            hold_id,
            category: Women,
            held_for: HeldFor::Arrival,
            expires_at: LATER,
            holder_agency: "kg-iom".into(),
        };
        let (first, second) = (HoldId::new(), HoldId::new());
        let held = then(&given(&[registered(2)]), &arrival(first));
        let Event::BedHeld(bed) = &held else {
            panic!("expected BedHeld, got {held:?}");
        };
        assert_eq!(bed.referral_id, "");
        assert_eq!(bed.holder_agency, "kg-iom");
        // Two people arriving: two beds (one per return is the reaction's rule).
        let other = then(&given(&[registered(2), held.clone()]), &arrival(second));
        let full = given(&[registered(2), held.clone(), other]);
        assert_eq!(full.free(Women as i32), 0);
        assert_eq!(decide(&full, &arrival(HoldId::new())), Err(DomainError::NoBedFree));
        // Released, admitted and expired like a referral's hold.
        let Event::HoldReleased(released) = then(&full, &Command::ReleaseHold { hold_id: first }) else {
            panic!("expected HoldReleased");
        };
        assert_eq!(released.referral_id, "");
        assert!(matches!(
            then(
                &full,
                &Command::Admit {
                    hold_id: second,
                    now: NOW
                }
            ),
            Event::PersonAdmitted(_)
        ));
        // An arrival's hold never blocks a referral's.
        assert!(matches!(
            then(&given(&[registered(3), held]), &hold(HoldId::new(), ReferralId::new())),
            Event::BedHeld(_)
        ));
    }

    #[test]
    fn release_and_expiry_free_the_bed_and_expiry_after_release_changes_nothing() {
        let hold_id = HoldId::new();
        let held = then(&given(&[registered(1)]), &hold(hold_id, ReferralId::new()));
        let shelter = given(&[registered(1), held.clone()]);
        assert_eq!(shelter.free(Women as i32), 0);

        let expired = then(&shelter, &Command::ExpireHold { hold_id });
        assert_eq!(given(&[registered(1), held.clone(), expired]).free(Women as i32), 1);

        let released = then(&shelter, &Command::ReleaseHold { hold_id });
        let after_release = given(&[registered(1), held, released]);
        assert_eq!(after_release.free(Women as i32), 1);
        assert_eq!(decide(&after_release, &Command::ExpireHold { hold_id }), Ok(vec![]));
        assert_eq!(
            decide(&after_release, &Command::ReleaseHold { hold_id }),
            Err(DomainError::NotHeld)
        );
    }

    #[test]
    fn admission_needs_a_held_unexpired_hold_and_discharge_happens_once() {
        let hold_id = HoldId::new();
        let base = given(&[registered(1)]);
        assert_eq!(
            decide(&base, &Command::Admit { hold_id, now: NOW }),
            Err(DomainError::AdmitWithoutHold)
        );
        let held = then(&base, &hold(hold_id, ReferralId::new()));
        let shelter = given(&[registered(1), held.clone()]);
        // Past its expiry a hold admits no one, even before the timer fired.
        assert_eq!(
            decide(&shelter, &Command::Admit { hold_id, now: LATER }),
            Err(DomainError::AdmitWithoutHold)
        );
        let admitted = then(&shelter, &Command::Admit { hold_id, now: NOW });
        let inside = given(&[registered(1), held.clone(), admitted.clone()]);
        assert_eq!(inside.free(Women as i32), 0, "an admitted person occupies the bed");
        assert_eq!(decide(&inside, &Command::ExpireHold { hold_id }), Ok(vec![]));

        let discharged = then(&inside, &Command::Discharge { hold_id, now: NOW });
        let left = given(&[registered(1), held, admitted, discharged]);
        assert_eq!(left.free(Women as i32), 1);
        assert_eq!(
            decide(&left, &Command::Discharge { hold_id, now: NOW }),
            Err(DomainError::NotAdmitted)
        );
    }

    #[test]
    fn capacity_never_goes_below_the_beds_taken() {
        let held = then(&given(&[registered(3)]), &hold(HoldId::new(), ReferralId::new()));
        let shelter = given(&[registered(3), held]);
        assert_eq!(
            decide(
                &shelter,
                &Command::ChangeCapacity {
                    category: Women,
                    beds: 0
                }
            ),
            Err(DomainError::CapacityBelowOccupancy { occupied: 1 })
        );
        let changed = then(
            &shelter,
            &Command::ChangeCapacity {
                category: Women,
                beds: 1,
            },
        );
        assert_eq!(
            given(&[registered(3), hold_event(&shelter), changed]).free(Women as i32),
            0
        );
    }

    fn hold_event(shelter: &Shelter) -> Event {
        let (id, h) = shelter.holds.iter().next().expect("a hold");
        Event::BedHeld(pb::BedHeld {
            shelter_id: "s1".into(),
            hold_id: id.clone(),
            category: h.category,
            referral_id: h.referral_id.clone(),
            expires_at: Some(h.expires_at),
            region: "KG-O".into(),
            holder_agency: h.holder_agency.clone(),
        })
    }

    #[test]
    fn commands_on_a_missing_shelter_are_not_found_and_registration_happens_once() {
        assert_eq!(
            decide(&Shelter::default(), &Command::ReleaseHold { hold_id: HoldId::new() }),
            Err(DomainError::NotFound)
        );
        let Event::ShelterRegistered(r) = registered(1) else {
            unreachable!()
        };
        assert_eq!(
            decide(
                &given(&[registered(1)]),
                &Command::Register {
                    registered: Box::new(r)
                }
            ),
            Err(DomainError::AlreadyRegistered)
        );
    }
}

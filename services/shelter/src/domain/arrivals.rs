//! What a return announced from abroad asks of a bed at home. Pure rules;
//! the arrivals reaction (`reactions::arrivals`) applies them to the
//! snapshots of the home country's repatriation stream.
//!
//! - [`needs_shelter`]: the needs on arrival (shared only with the person's
//!   consent, `SHARED_FIELD_NEEDS`) include `ARRIVAL_NEED_SHELTER`.
//! - [`region_of`]: the region of the arrival point, from a small table of
//!   Kyrgyzstan's international airports (IATA codes) and road border posts.
//! - [`candidates`]: the order in which shelters are tried: the arrival
//!   region's, then the nearest regions of the same country.
//! - [`category_of`]: the bed category from the profile (shared only with
//!   `SHARED_FIELD_PROFILE`): children by age band, then women or men by
//!   gender; [`DEFAULT_CATEGORY`] when the profile does not say.
//! - [`hold_until`]: the end of the arrival window.

use chrono::{DateTime, Duration, Utc};
use nrm_proto::common::v1::{AgeBand, Gender};
use nrm_proto::repatriation::v1::ArrivalNeed;
use nrm_proto::shelter::v1::BedCategory;

use super::regions;

/// The bed category held when the profile was not shared (or names neither
/// a child's age band nor a gender of female or male): a women's bed. Most
/// shelters and crisis centres of the mechanism take women, and a woman is
/// never sent to a men's shelter by default; the agency the bed is held for
/// releases it when the person needs another kind of bed.
pub const DEFAULT_CATEGORY: BedCategory = BedCategory::Women;

/// Arrival points and the region (ISO 3166-2) placement looks in first.
/// Codes as the itinerary names them: IATA codes for airports, the post's
/// name in capitals with hyphens for road border posts (spaces and
/// underscores count as hyphens, case does not matter).
const ARRIVAL_POINTS: &[(&str, &str)] = &[
    // Airports
    ("FRU", "KG-C"), // Manas International, Bishkek (in Chüy region)
    ("OSS", "KG-O"), // Osh International
    ("IKU", "KG-Y"), // Issyk-Kul International, Tamchy
    // Road border posts
    ("AK-JOL", "KG-C"),    // Kazakhstan (Bishkek–Almaty road), Chüy
    ("AK-TILEK", "KG-C"),  // Kazakhstan, Chüy
    ("DOSTUK", "KG-O"),    // Uzbekistan, Osh region
    ("KARA-SUU", "KG-O"),  // Uzbekistan, Osh region
    ("KYZYL-BEL", "KG-B"), // Tajikistan, Batken
    ("KARAMYK", "KG-O"),   // Tajikistan, Osh region (Chong-Alay)
    ("IRKESHTAM", "KG-O"), // China, Osh region (Alay)
    ("TORUGART", "KG-N"),  // China, Naryn
];

/// Whether the needs on arrival (`ArrivalNeed` values) include a shelter.
#[must_use]
pub fn needs_shelter(needs: &[i32]) -> bool {
    needs.contains(&(ArrivalNeed::Shelter as i32))
}

/// The region placement looks in first for a person arriving at `point`;
/// `None` for a point the table does not know (then any region will do).
#[must_use]
pub fn region_of(point: &str) -> Option<&'static str> {
    let code: String = point
        .trim()
        .chars()
        .map(|c| match c {
            ' ' | '_' => '-',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    ARRIVAL_POINTS
        .iter()
        .find(|(known, _)| *known == code)
        .map(|&(_, region)| region)
}

/// The bed category for a person of `gender` and `age_band` (their proto
/// values; unspecified when the profile was not shared): children's beds
/// for an age band under 18, women's or men's beds by gender, otherwise
/// [`DEFAULT_CATEGORY`].
#[must_use]
pub fn category_of(gender: i32, age_band: i32) -> BedCategory {
    if let Ok(AgeBand::AgeBand011 | AgeBand::AgeBand1217) = AgeBand::try_from(age_band) {
        return BedCategory::Children;
    }
    match Gender::try_from(gender) {
        Ok(Gender::Female) => BedCategory::Women,
        Ok(Gender::Male) => BedCategory::Men,
        _ => DEFAULT_CATEGORY,
    }
}

/// When the hold for a person expected at `arrival_at` expires: `minutes`
/// (the service's hold default) after the arrival, or after `now` when the
/// arrival time is already past (a return first seen late, or delayed).
#[must_use]
pub fn hold_until(arrival_at: DateTime<Utc>, now: DateTime<Utc>, minutes: u32) -> DateTime<Utc> {
    arrival_at.max(now) + Duration::minutes(i64::from(minutes))
}

/// The country part of a region code (`KG` of `KG-C`).
fn country(region: &str) -> &str {
    region.split_once('-').map_or(region, |(c, _)| c)
}

/// Of `shelters` (ID, region, free beds), the order in which placement
/// tries them for a person arriving in `region`: that region's first, then
/// the other regions of the same country, nearest first (regions the
/// centroid table does not know after those, by code); within a region,
/// most free beds first. Shelters in other countries are left out. With no
/// region, every shelter, most free beds first.
#[must_use]
pub fn candidates<T: Ord>(region: Option<&str>, shelters: Vec<(T, String, i32)>) -> Vec<T> {
    let Some(region) = region else {
        let mut all = shelters;
        all.sort_by(|(ia, _, fa), (ib, _, fb)| fb.cmp(fa).then_with(|| ia.cmp(ib)));
        return all.into_iter().map(|(id, _, _)| id).collect();
    };
    let origin = regions::centroid(region);
    let mut ranked: Vec<((u8, f64, String, i32), T)> = shelters
        .into_iter()
        .filter(|(_, r, _)| country(r) == country(region))
        .map(|(id, r, free)| {
            let (rank, km) = if r == region {
                (0, 0.0)
            } else {
                match origin.zip(regions::centroid(&r)) {
                    Some((a, b)) => (1, regions::distance_km(a, b)),
                    None => (2, 0.0),
                }
            };
            ((rank, km, r, -free), id)
        })
        .collect();
    ranked.sort_by(|(ka, ia), (kb, ib)| {
        ka.0.cmp(&kb.0)
            .then_with(|| ka.1.total_cmp(&kb.1))
            .then_with(|| ka.2.cmp(&kb.2))
            .then_with(|| ka.3.cmp(&kb.3))
            .then_with(|| ia.cmp(ib))
    });
    ranked.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_points_map_to_regions_the_centroid_table_knows() {
        assert_eq!(region_of("FRU"), Some("KG-C"));
        assert_eq!(region_of(" oss "), Some("KG-O"));
        assert_eq!(region_of("kara suu"), Some("KG-O"));
        assert_eq!(region_of("Ak_Jol"), Some("KG-C"));
        assert_eq!(region_of("LED"), None);
        assert_eq!(region_of(""), None);
        for (code, region) in ARRIVAL_POINTS {
            assert!(regions::centroid(region).is_some(), "{code} → {region}");
        }
    }

    #[test]
    fn children_by_age_band_then_women_or_men_by_gender_else_the_default() {
        let (female, male) = (Gender::Female as i32, Gender::Male as i32);
        assert_eq!(category_of(male, AgeBand::AgeBand1217 as i32), BedCategory::Children);
        assert_eq!(category_of(0, AgeBand::AgeBand011 as i32), BedCategory::Children);
        assert_eq!(category_of(female, AgeBand::AgeBand2534 as i32), BedCategory::Women);
        assert_eq!(category_of(male, 0), BedCategory::Men);
        // Not shared, or saying neither.
        assert_eq!(category_of(0, 0), DEFAULT_CATEGORY);
        assert_eq!(
            category_of(Gender::Other as i32, AgeBand::Unknown as i32),
            DEFAULT_CATEGORY
        );
    }

    #[test]
    fn the_window_ends_a_hold_default_after_the_arrival_or_after_now_when_it_passed() {
        let now = DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default();
        let arrival = now + Duration::hours(30);
        assert_eq!(hold_until(arrival, now, 1440), arrival + Duration::hours(24));
        assert_eq!(hold_until(now - Duration::hours(3), now, 60), now + Duration::hours(1));
    }

    #[test]
    fn a_shelter_need_is_read_from_the_needs() {
        assert!(needs_shelter(&[
            ArrivalNeed::Medical as i32,
            ArrivalNeed::Shelter as i32
        ]));
        assert!(!needs_shelter(&[ArrivalNeed::Escort as i32]));
        assert!(!needs_shelter(&[]));
    }

    #[test]
    fn the_arrival_region_comes_first_then_the_nearest_regions_of_its_country() {
        let shelters = vec![
            (1, "KG-O".to_owned(), 9),
            (2, "KG-GB".to_owned(), 1),
            (3, "KG-C".to_owned(), 1),
            (4, "KG-C".to_owned(), 4),
            (5, "KZ-75".to_owned(), 9),
            (6, "KG-ZZ".to_owned(), 9),
        ];
        // Chüy's two (most free first), Bishkek next door, Osh far away,
        // a region without a centroid last, Almaty (another country) never.
        assert_eq!(candidates(Some("KG-C"), shelters.clone()), vec![4, 3, 2, 1, 6]);
        assert_eq!(candidates(None, shelters), vec![1, 5, 6, 4, 2, 3]);
    }
}

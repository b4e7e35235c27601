//! Region centroids, and which regions with a free bed are nearest.
//!
//! A small static table of approximate centroids (latitude, longitude in
//! degrees) of the ISO 3166-2 regions where shelters of the mechanism are:
//! every region of Kyrgyzstan, and the regions of Tajikistan, Uzbekistan and
//! Kazakhstan near it. Kazakhstan's regions are listed under both their
//! current numeric codes and the older letter codes still in use.
//! Distances are great-circle distances between centroids: good enough to
//! say "Osh city before Bishkek" when a bed is missing in the Osh region.

/// Most regions named in a `NoBedAvailable`.
pub const MAX_NEAREST: usize = 5;

/// (code, latitude, longitude).
const CENTROIDS: &[(&str, f64, f64)] = &[
    // Kyrgyzstan
    ("KG-GB", 42.87, 74.59), // Bishkek city
    ("KG-GO", 40.53, 72.80), // Osh city
    ("KG-C", 42.65, 74.30),  // Chüy
    ("KG-T", 42.35, 72.25),  // Talas
    ("KG-Y", 42.20, 77.80),  // Issyk-Kul
    ("KG-N", 41.35, 75.45),  // Naryn
    ("KG-J", 41.50, 72.50),  // Jalal-Abad
    ("KG-O", 39.95, 73.30),  // Osh region
    ("KG-B", 39.90, 70.90),  // Batken
    // Tajikistan
    ("TJ-DU", 38.56, 68.78), // Dushanbe
    ("TJ-SU", 39.90, 69.40), // Sughd
    ("TJ-RA", 38.70, 69.70), // Districts of Republican Subordination
    ("TJ-KT", 37.60, 68.90), // Khatlon
    ("TJ-GB", 38.10, 73.00), // Gorno-Badakhshan
    // Uzbekistan
    ("UZ-TK", 41.30, 69.24), // Tashkent city
    ("UZ-TO", 41.20, 69.80), // Tashkent region
    ("UZ-AN", 40.75, 72.35), // Andijan
    ("UZ-NG", 41.00, 71.40), // Namangan
    ("UZ-FA", 40.40, 71.80), // Fergana
    ("UZ-SA", 39.70, 66.70), // Samarkand
    // Kazakhstan (numeric codes since 2020, letter codes before)
    ("KZ-71", 51.17, 71.45), // Astana
    ("KZ-AST", 51.17, 71.45),
    ("KZ-75", 43.24, 76.89), // Almaty city
    ("KZ-ALA", 43.24, 76.89),
    ("KZ-19", 43.90, 77.50), // Almaty region
    ("KZ-ALM", 43.90, 77.50),
    ("KZ-79", 42.32, 69.59), // Shymkent
    ("KZ-SHY", 42.32, 69.59),
    ("KZ-31", 44.00, 72.00), // Zhambyl
    ("KZ-ZHA", 44.00, 72.00),
];

/// The centroid of a region, if the table knows it.
#[must_use]
pub fn centroid(region: &str) -> Option<(f64, f64)> {
    CENTROIDS
        .iter()
        .find(|(code, _, _)| *code == region)
        .map(|&(_, lat, lon)| (lat, lon))
}

/// Great-circle distance in kilometres (haversine).
#[must_use]
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().asin()
}

/// Of `with_beds`, the regions other than `from`, nearest first (at most
/// [`MAX_NEAREST`]). Regions the table does not know come after the known
/// ones, by code; when `from` itself is unknown, every region is ordered by code.
#[must_use]
pub fn nearest(from: &str, with_beds: impl IntoIterator<Item = String>) -> Vec<String> {
    let origin = centroid(from);
    let mut regions: Vec<(Option<f64>, String)> = with_beds
        .into_iter()
        .filter(|r| r != from)
        .map(|r| {
            let distance = origin.zip(centroid(&r)).map(|(a, b)| distance_km(a, b));
            (distance, r)
        })
        .collect();
    regions.sort_by(|(da, ra), (db, rb)| match (da, db) {
        (Some(a), Some(b)) => a.total_cmp(b).then_with(|| ra.cmp(rb)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => ra.cmp(rb),
    });
    regions.dedup_by(|a, b| a.1 == b.1);
    regions.into_iter().take(MAX_NEAREST).map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(codes: &[&str]) -> Vec<String> {
        codes.iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn every_kyrgyz_region_has_a_centroid() {
        for code in ["KG-GB", "KG-GO", "KG-C", "KG-O", "KG-J", "KG-B", "KG-N", "KG-T", "KG-Y"] {
            assert!(centroid(code).is_some(), "{code}");
        }
    }

    #[test]
    fn bishkek_to_osh_is_about_three_hundred_km() {
        let d = distance_km(centroid("KG-GB").unwrap(), centroid("KG-GO").unwrap());
        assert!((280.0..320.0).contains(&d), "{d}");
    }

    #[test]
    fn nearest_regions_come_first_and_the_origin_is_left_out() {
        let got = nearest("KG-O", owned(&["KG-GB", "KG-GO", "KG-O", "KG-Y", "XX-1", "KG-J"]));
        assert_eq!(got, owned(&["KG-GO", "KG-J", "KG-GB", "KG-Y", "XX-1"]));
        // From an unknown region: by code.
        assert_eq!(nearest("ZZ-9", owned(&["KG-Y", "KG-B"])), owned(&["KG-B", "KG-Y"]));
        assert!(nearest("KG-O", Vec::new()).is_empty());
    }
}

//! `nrmctl return` as users in two countries run it: the README's
//! walk-through "Two countries: make run-federation", on the same parts.
//! Two nats-servers from deploy/federation (ru the hub, kg its leaf over
//! TLS), a repatriation service process in each country with its key pair
//! from `nrmctl xborder keygen`, and nrmctl with the roles the permission
//! matrix allows: in ru the IOM office and kg's consulate run the return;
//! in kg the IOM office sees it announced before departure, with only the
//! shared fields, and follows it to the handover.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nrm_e2e::federation::{Federation, Side};
use nrm_e2e::{ServiceProcess, binary, issuer_key_path, process_env, settings, unique};

/// One country's repatriation service and how nrmctl reaches it.
struct Country {
    code: &'static str,
    service: ServiceProcess,
    database: nrm_kernel::settings::DatabaseSettings,
}

impl Country {
    fn start(federation: &Federation, side: Side, keys: &Path) -> Self {
        let code = side.code();
        let partner = if side == Side::Ru { "kg" } else { "ru" };
        let mut base = settings();
        base.nats = federation.nats_settings(side);
        let service = format!("{code}_repatriation");
        let private_key = keys.join(format!("{code}.key")).display().to_string();
        let partners = format!("{partner}={}", keys.join(format!("{partner}.pub")).display());
        let env = process_env(
            &base,
            &service,
            &[
                ("NRM_XBORDER__COUNTRY", code),
                ("NRM_XBORDER__PRIVATE_KEY_FILE", &private_key),
                ("NRM_XBORDER__PARTNERS", &partners),
            ],
        );
        let mut database = base.database.clone();
        database.name = format!("{}_{service}", base.database.name);
        Self {
            code,
            service: ServiceProcess::start("repatriation", env),
            database,
        }
    }

    /// nrmctl against this country's service as `agency` with `role`.
    fn nrmctl(&self, agency: &str, role: &str, args: &[&str]) -> Output {
        Command::new(binary("nrmctl"))
            .args(args)
            .env("NRM_REPATRIATION_ENDPOINT", &self.service.endpoint)
            .env("NRM_ISSUER_KEY", issuer_key_path())
            .env("NRM_AGENCY", agency)
            .env("NRM_ROLE", role)
            .env("NRM_OFFICER", format!("{}-officer-1", self.code))
            .env_remove("NRM_TOKEN")
            .env_remove("NRM_OUTPUT")
            .output()
            .expect("run nrmctl")
    }

    /// The same, `--output json`, and the parsed answer.
    fn json(&self, agency: &str, role: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let output = self.nrmctl(agency, role, &all);
        assert!(
            output.status.success(),
            "nrmctl {args:?} in {} failed: {}",
            self.code,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("JSON output")
    }
}

/// The refusal nrmctl printed on stderr, after checking it exited with 1.
fn refused(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected a refusal: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `nrmctl xborder keygen` for both countries, in a folder of its own.
fn keygen() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nrm-test-keys-{}", unique()));
    for code in ["ru", "kg"] {
        let status = Command::new(binary("nrmctl"))
            .args(["xborder", "keygen", "--country", code, "--dir"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "nrmctl xborder keygen --country {code}");
    }
    dir
}

/// RFC 3339, `hours` from now.
fn in_hours(hours: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::hours(hours)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The version a command answered with.
fn version(answer: &serde_json::Value) -> String {
    let result = answer.get("result").unwrap_or(answer);
    result["version"].as_str().unwrap().to_owned()
}

/// Polls `return show ID` in kg as its IOM office until the return is in
/// `status` (20 s at most); the return as kg sees it.
fn wait_in_kg(kg: &Country, return_id: &str, status: &str) -> serde_json::Value {
    for _ in 0..200 {
        let output = kg.nrmctl("kg-iom", "iom", &["--output", "json", "return", "show", return_id]);
        if output.status.success() {
            let found: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            if found["status"] == status {
                return found;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("kg never saw return {return_id} in {status}");
}

// nrmctl runs as a blocking child process while the services answer on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_is_run_in_ru_and_followed_in_kg_with_nrmctl() {
    let federation = Federation::start().await;
    let keys = keygen();
    let ru = Country::start(&federation, Side::Ru, &keys);
    let kg = Country::start(&federation, Side::Kg, &keys);
    let iom = |args: &[&str]| ru.json("ru-iom", "iom", args);

    // In ru, the IOM office opens a return for a Kyrgyz citizen.
    let opened = iom(&[
        "return",
        "open",
        "--citizenship",
        "KG",
        "--consulate",
        "kg-consulate-moscow",
        "--identified-by",
        "ru-mvd",
        "--foreign-reference",
        "RU-77-0042",
        "--gender",
        "female",
        "--age-band",
        "18-24",
        "--form",
        "labour",
        "--exploitation-country",
        "RU",
        "--name",
        "Aida Example",
        "--passport",
        "AC1234567:KG",
    ]);
    let id = opened["return_id"].as_str().unwrap().to_owned();
    let mut v = version(&opened);

    // Consent: the profile, the needs and the risk may cross; not the identity.
    v = version(&iom(&[
        "return",
        "consent",
        &id,
        "--version",
        &v,
        "--informed",
        "--share",
        "profile,needs,risk",
        "--reintegration",
        "--attested-by",
        "iom-7",
        "--form-ref",
        "RU-F-12",
    ]));
    v = version(&iom(&[
        "return",
        "assess",
        &id,
        "--version",
        &v,
        "--safe",
        "--family",
        "none",
        "--need",
        "shelter,interpretation",
        "--language",
        "ky",
    ]));
    v = version(&iom(&["return", "request-document", &id, "--version", &v]));
    // The consulate issues the certificate of return.
    v = version(&ru.json(
        "kg-consulate-moscow",
        "consulate",
        &[
            "return",
            "document",
            &id,
            "--version",
            &v,
            "--issued",
            "--number",
            "CR-2026-0042",
            "--valid-until",
            &in_hours(24 * 60),
        ],
    ));
    let (departure, arrival) = (in_hours(48), in_hours(53));
    v = version(&iom(&[
        "return",
        "itinerary",
        &id,
        "--version",
        &v,
        "--departure",
        &departure,
        "--arrival",
        &arrival,
        "--carrier",
        "KC 210",
        "--airport",
        "FRU",
    ]));
    v = version(&iom(&[
        "return",
        "escort",
        &id,
        "--version",
        &v,
        "--officer",
        "esc-3",
        "--agency",
        "ru-iom",
    ]));

    // In kg the return is announced before departure, with what was shared.
    let announced = wait_in_kg(&kg, &id, "RETURN_STATUS_ESCORT_ASSIGNED");
    assert_eq!(announced["direction"], "DIRECTION_INCOMING");
    assert_eq!(announced["arrival_point"], "FRU");
    assert_eq!(announced["carrier"], "KC 210");
    assert_eq!(
        announced["needs"],
        serde_json::json!(["ARRIVAL_NEED_SHELTER", "ARRIVAL_NEED_INTERPRETATION"])
    );
    assert_eq!(announced["form_of_exploitation"], "EXPLOITATION_FORM_LABOUR");
    let text = announced.to_string();
    assert!(
        !text.contains("Aida") && !text.contains("AC1234567") && !text.contains("CR-2026"),
        "the identity was not shared, so it did not cross: {text}"
    );
    let listed = kg.json("kg-iom", "iom", &["return", "list", "--direction", "incoming"]);
    assert!(
        listed["returns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["return_id"] == id.as_str()),
        "{listed}"
    );
    // kg reads, it does not run the return.
    let incoming = refused(&kg.nrmctl("kg-iom", "iom", &["return", "depart", &id, "--version", &v]));
    assert!(incoming.contains("FAILED_PRECONDITION"), "{incoming}");

    // Departure, arrival and handover in ru; kg sees the same steps.
    v = version(&iom(&["return", "depart", &id, "--version", &v]));
    v = version(&iom(&["return", "arrive", &id, "--version", &v]));
    v = version(&iom(&[
        "return",
        "handover",
        &id,
        "--version",
        &v,
        "--received-by",
        "kg-iom",
    ]));
    let home = wait_in_kg(&kg, &id, "RETURN_STATUS_HANDED_OVER");
    let here = iom(&["return", "show", &id]);
    let steps = |r: &serde_json::Value| {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["step"].clone(), s["origin_version"].clone()))
            .collect::<Vec<_>>()
    };
    let (ru_steps, kg_steps) = (steps(&here), steps(&home));
    assert!(ru_steps.len() >= 10, "{ru_steps:?}");
    assert_eq!(kg_steps, ru_steps, "both sides see the same step history");
    assert_eq!(here["version"], v.as_str());

    // A step out of order, and bad input, get a clear answer in text.
    let finished = refused(&ru.nrmctl("ru-iom", "iom", &["return", "depart", &id, "--version", &v]));
    assert!(finished.starts_with("error: FAILED_PRECONDITION"), "{finished}");
    let bad = refused(&ru.nrmctl(
        "ru-iom",
        "iom",
        &[
            "return",
            "open",
            "--citizenship",
            "K1",
            "--consulate",
            "kg-consulate-moscow",
            "--identified-by",
            "ru-mvd",
            "--foreign-reference",
            "RU-77-0043",
        ],
    ));
    assert!(
        bad.starts_with("error: INVALID_ARGUMENT") && bad.contains("citizenship"),
        "{bad}"
    );

    let shown = ru.nrmctl("ru-iom", "iom", &["return", "show", &id]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("status:") && text.contains("handed-over"), "{text}");

    for country in [ru, kg] {
        let Country {
            mut service, database, ..
        } = country;
        service.kill();
        let _ = nrm_kernel::db::drop_database(&database).await;
    }
    let _ = std::fs::remove_dir_all(keys);
}

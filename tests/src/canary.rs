//! The canary sweep shared by the `pii*` tests: personal data that must reach
//! no log line, no span, no metric and no error, the capture of every log
//! line and span of the test process at debug level, the search for the
//! canaries in what was captured, and a sweep that pastes every canary into
//! every string field of an RPC (one field at a time and all at once) as
//! callers of every standing, counting the status codes it reaches.
//!
//! Each `pii*` test file is its own process, so [`capture`] sees everything
//! the services of that process log.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use nrm_kernel::settings::TelemetrySettings;
use nrm_proto::common::v1 as common;
use tonic::{Code, Status};

/// A full name.
pub const NAME: &str = "Zarina Canaryname Tokoeva";
/// The part of every name canary that is searched for (lower case).
pub const NAME_PART: &str = "canaryname";
/// A passport number; it is also a well-formed request ID, agency code and reference.
pub const PASSPORT: &str = "CANARY998877";
/// A phone number.
pub const PHONE: &str = "+996 700 123 987";
/// The phone's digits, searched for among all the digits of a text.
pub const PHONE_DIGITS: &str = "700123987";
/// A street address (a person's, or a shelter's).
pub const ADDRESS: &str = "Osh, Canarystreet 5";
/// A date of birth (no timestamp of a test run is in 1931).
pub const DATE_OF_BIRTH: &str = "1931-07-13";
/// A name written as a code: it passes every code, reference and status check.
pub const CODED_NAME: &str = "ZARINA_CANARYNAME";
/// A name in Cyrillic.
pub const CYRILLIC_NAME: &str = "Зарина Канарейкина";
/// The searched part of the Cyrillic name (lower case).
const CYRILLIC_PART: &str = "канарейкина";

/// The personal identifiers of the canary person.
#[must_use]
pub fn identifiers() -> common::PersonalIdentifiers {
    common::PersonalIdentifiers {
        full_name: NAME.into(),
        date_of_birth: DATE_OF_BIRTH.into(),
        documents: vec![common::IdentityDocument {
            r#type: common::DocumentType::Passport as i32,
            number: PASSPORT.into(),
            issuing_country: "KG".into(),
        }],
        phone: PHONE.into(),
        address: ADDRESS.into(),
    }
}

/// Every canary a sweep pastes into a field: the name, the document, the
/// phone, the address, the date of birth, a name that passes as a code, one
/// after a valid UUID, a very long one and one in Cyrillic.
#[must_use]
pub fn values() -> Vec<String> {
    vec![
        NAME.to_owned(),
        PASSPORT.to_owned(),
        PHONE.to_owned(),
        ADDRESS.to_owned(),
        DATE_OF_BIRTH.to_owned(),
        CODED_NAME.to_owned(),
        format!("{}{NAME}", uuid::Uuid::now_v7()),
        NAME.repeat(20),
        CYRILLIC_NAME.to_owned(),
    ]
}

/// Which canaries `haystack` holds (none: an empty list).
#[must_use]
pub fn leaks(haystack: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(haystack).to_lowercase();
    let compact: String = text.chars().filter(char::is_ascii_digit).collect();
    let mut found = Vec::new();
    if text.contains(NAME_PART) || text.contains(CYRILLIC_PART) {
        found.push("name");
    }
    if text.contains(&PASSPORT.to_lowercase()) {
        found.push("document number");
    }
    if text.contains("700 123 987") || compact.contains(PHONE_DIGITS) {
        found.push("phone");
    }
    if text.contains("canarystreet") {
        found.push("address");
    }
    if text.contains(DATE_OF_BIRTH) || text.contains("13.07.1931") {
        found.push("date of birth");
    }
    found
}

/// Asserts that `haystack` holds no canary.
///
/// # Panics
/// Naming `what` and the canaries found, with the first offending line.
pub fn assert_clean(haystack: &[u8], what: &str) {
    let found = leaks(haystack);
    if !found.is_empty() {
        let text = String::from_utf8_lossy(haystack);
        let line = text
            .lines()
            .find(|l| !leaks(l.as_bytes()).is_empty())
            .unwrap_or_default();
        panic!("{what} leak {found:?}; first line: {line}");
    }
}

/// Everything the process logged (log lines and closed spans, JSON).
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// What was captured so far.
    ///
    /// # Panics
    /// When the lock is poisoned.
    #[must_use]
    pub fn logs(&self) -> Vec<u8> {
        self.0.lock().expect("capture lock").clone()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The capture of every log line and span of this process, at debug level
/// (installed by the first call).
///
/// # Panics
/// When another subscriber was installed first.
pub fn capture() -> Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Capture::default();
            let writer = capture.clone();
            let settings = TelemetrySettings {
                log: "debug".into(),
                log_format: "json".into(),
            };
            let guard = nrm_kernel::telemetry::init_with_writer("pii-test", &settings, move || writer.clone())
                .expect("this process's only subscriber");
            // Lives as long as the test process.
            std::mem::forget(guard);
            capture
        })
        .clone()
}

/// A local address nobody listens on (for a service's `/metrics`).
///
/// # Panics
/// When no port can be bound.
#[must_use]
pub fn free_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address")
}

/// `GET url` over a plain TCP connection (no HTTP client dependency for one call).
///
/// # Panics
/// When the server cannot be reached.
pub async fn get(url: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    stream
        .write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

/// What the sweep was told: the code of each answer, counted.
#[derive(Debug, Default)]
pub struct Answers(pub BTreeMap<String, usize>);

impl Answers {
    /// Counts an answer; an error's message, details and metadata must hold no canary.
    ///
    /// # Panics
    /// When they do.
    pub fn record<T>(&mut self, what: &str, answer: Result<tonic::Response<T>, Status>) {
        let code = match answer {
            Ok(_) => "Ok".to_owned(),
            Err(status) => {
                assert_eq!(
                    leaks(status.message().as_bytes()),
                    Vec::<&str>::new(),
                    "{what}: message"
                );
                assert_eq!(leaks(status.details()), Vec::<&str>::new(), "{what}: details");
                assert_eq!(
                    leaks(format!("{:?}", status.metadata()).as_bytes()),
                    Vec::<&str>::new(),
                    "{what}: metadata"
                );
                format!("{:?}", status.code())
            }
        };
        *self.0.entry(code).or_default() += 1;
    }

    /// How many answers were counted.
    #[must_use]
    pub fn calls(&self) -> usize {
        self.0.values().sum()
    }

    /// Asserts that each of `codes` was answered at least once.
    ///
    /// # Panics
    /// Naming the first code never answered.
    pub fn assert_reached(&self, service: &str, codes: &[Code]) {
        for code in codes {
            let name = if *code == Code::Ok {
                "Ok".to_owned()
            } else {
                format!("{code:?}")
            };
            assert!(
                self.0.contains_key(&name),
                "{service}: the sweep never reached {name}: {:?}",
                self.0
            );
        }
    }
}

/// Every code class a sweep must reach.
pub const ERROR_CODES: [Code; 5] = [
    Code::InvalidArgument,
    Code::PermissionDenied,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::Unauthenticated,
];

/// A string field of a request that a canary is put into.
pub type Field<R> = (&'static str, fn(&mut R, &str));

/// The string fields of a request type: `fields!(pb::GetPlanRequest: person_id)`.
#[macro_export]
macro_rules! fields {
    ($ty:ty: $($name:ident),* $(,)?) => {
        [$((stringify!($name), (|r: &mut $ty, v: &str| r.$name = v.to_owned()) as fn(&mut $ty, &str))),*]
    };
}

/// Who calls: a name and the `authorization` metadata (none: no token).
#[derive(Debug, Clone)]
pub struct Caller {
    /// What the caller is, for failure messages.
    pub name: String,
    /// The whole `authorization` value.
    pub authorization: Option<String>,
    /// Whether the token is valid and its role may call some RPC; the other
    /// callers try each request once, with every field a canary.
    pub admitted: bool,
}

impl Caller {
    /// A caller with a valid `token`.
    #[must_use]
    pub fn with(name: &str, token: &str) -> Self {
        Self {
            name: name.to_owned(),
            authorization: Some(format!("Bearer {token}")),
            admitted: true,
        }
    }

    /// A caller the gate refuses: `authorization` as given (none: no token).
    #[must_use]
    pub fn refused(name: &str, authorization: Option<String>) -> Self {
        Self {
            name: name.to_owned(),
            authorization,
            admitted: false,
        }
    }

    /// `message` as this caller sends it, with `canary` in `x-correlation-id`
    /// and in the trace state (where it is ASCII).
    ///
    /// # Panics
    /// When the authorization is not ASCII.
    #[must_use]
    pub fn request<T>(&self, message: T, canary: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.parse().expect("ascii authorization"));
        }
        let ascii = if canary.is_ascii() { canary } else { PASSPORT };
        metadata.insert(nrm_kernel::grpc::CORRELATION_ID, ascii.parse().expect("ascii canary"));
        metadata.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("ascii"),
        );
        let state: String = ascii.chars().filter(char::is_ascii_alphanumeric).collect();
        metadata.insert(
            "tracestate",
            format!("canaryname={state}").parse().expect("ascii trace state"),
        );
        request
    }
}

/// A sweep: every canary, every caller, every field of every RPC it is run on.
pub struct Sweep {
    /// The canaries.
    pub values: Vec<String>,
    /// The callers.
    pub callers: Vec<Caller>,
    /// What was answered.
    pub answers: Answers,
    /// Answers per RPC and code.
    pub per_rpc: BTreeMap<String, BTreeMap<String, usize>>,
    /// Request IDs made so far.
    used: usize,
}

impl Sweep {
    /// A sweep of [`values`] as `callers`.
    #[must_use]
    pub fn new(callers: Vec<Caller>) -> Self {
        Self {
            values: values(),
            callers,
            answers: Answers::default(),
            per_rpc: BTreeMap::new(),
            used: 0,
        }
    }

    /// Calls `rpc` for every canary and caller on each of `bases` (named
    /// request builders, called afresh for every call so that request IDs
    /// are new): with the canary in each of `fields` in turn, then in all of
    /// them at once. A refused caller tries only the latter.
    pub async fn rpc<R, T, F, Fut>(
        &mut self,
        rpc: &str,
        bases: &[(&str, &dyn Fn() -> R)],
        fields: &[Field<R>],
        mut call: F,
    ) where
        F: FnMut(tonic::Request<R>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let values = self.values.clone();
        let callers = self.callers.clone();
        for value in &values {
            for caller in &callers {
                for (base_name, base) in bases {
                    // A request ID is used once: a canary that is a well-formed
                    // ID gets a suffix, so that each call reaches past the replay check.
                    let mut put = |field: &str, set: fn(&mut R, &str), request: &mut R| {
                        self.used += 1;
                        if field == "request_id" {
                            set(request, &format!("{value}.{}", self.used));
                        } else {
                            set(request, value);
                        }
                    };
                    let mut variants: Vec<(&str, R)> = Vec::new();
                    if caller.admitted {
                        for (field, set) in fields {
                            let mut request = base();
                            put(field, *set, &mut request);
                            variants.push((field, request));
                        }
                    }
                    let mut request = base();
                    for (field, set) in fields {
                        put(field, *set, &mut request);
                    }
                    variants.push(("every field", request));
                    for (field, request) in variants {
                        let what = format!("{rpc} ({base_name}) {field} = {value:?} by {}", caller.name);
                        let answer = call(caller.request(request, value)).await;
                        let code = answer
                            .as_ref()
                            .map_or_else(|s| format!("{:?}", s.code()), |_| "Ok".to_owned());
                        *self.per_rpc.entry(rpc.to_owned()).or_default().entry(code).or_default() += 1;
                        self.answers.record(&what, answer);
                    }
                }
            }
        }
    }

    /// Calls paths no RPC has, each holding a canary, on `channel`: the gate
    /// refuses them without repeating them.
    ///
    /// # Panics
    /// When the channel is not ready.
    pub async fn unknown_paths(&mut self, channel: &tonic::transport::Channel, service: &str) {
        let paths = [
            format!("/{service}/Zarina_Canaryname"),
            format!("/{service}/{PASSPORT}"),
            format!("/{service}/GetPlan/{PASSPORT}"),
            format!("/{service}/Osh,%20Canarystreet%205"),
            format!("/{service}/+996700123987"),
            format!("/{service}/{DATE_OF_BIRTH}"),
            format!("/Canaryname.v1.Service/{PASSPORT}"),
            "/grpc.health.v1.Health/Canaryname".to_owned(),
        ];
        let callers = self.callers.clone();
        for path in paths {
            for caller in &callers {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.expect("channel ready");
                let path_and_query = tonic::codegen::http::uri::PathAndQuery::try_from(path.as_str()).expect("a path");
                let answer = grpc
                    .unary::<(), (), _>(
                        caller.request((), NAME),
                        path_and_query,
                        tonic_prost::ProstCodec::default(),
                    )
                    .await;
                let code = answer
                    .as_ref()
                    .map_or_else(|s| format!("{:?}", s.code()), |_| "Ok".to_owned());
                *self
                    .per_rpc
                    .entry("(unknown path)".to_owned())
                    .or_default()
                    .entry(code)
                    .or_default() += 1;
                self.answers.record(&format!("{path} by {}", caller.name), answer);
            }
        }
    }

    /// Prints what the sweep reached, per RPC and in all.
    pub fn print(&self, service: &str) {
        for (rpc, codes) in &self.per_rpc {
            println!("{service} {rpc}: {codes:?}");
        }
        println!(
            "{service}: {} calls of the canary sweep: {:?}",
            self.answers.calls(),
            self.answers.0
        );
    }
}

//! The load generator, its clients and the history.
//!
//! Every command is sent as a real client would: with a request ID of its
//! own and an `x-correlation-id` (so the checker finds its events), retried
//! with the same request on `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`,
//! dropped connections and timeouts, with a bounded back-off and a bounded
//! total time; on `ABORTED` the aggregate's version is read again and the
//! command sent again under the same request ID. What the client was told in
//! the end goes into the [`History`]: `ok` with the answer's IDs, version and
//! event IDs, `fail` for a definite refusal, `info` when it gave up.
//!
//! A case walks: report → screening → decision → consent → referral (to MSD,
//! urgent, mostly with a shelter need; to MoH, normal, without) → accept,
//! decline or no answer (an urgent one is then escalated) → for MSD the bed
//! the placement reaction held, for MoH a bed held by hand → admission →
//! discharge. Some steps are refused on purpose (a malformed report, an
//! accept after a decline). Every name is made up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::identification::v1 as id;
use nrm_proto::referral::v1 as rf;
use nrm_proto::shelter::v1 as sh;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;
use uuid::Uuid;

use id::identification_service_client::IdentificationServiceClient;
use rf::referral_service_client::ReferralServiceClient;
use sh::shelter_service_client::ShelterServiceClient;

use super::inject::{Service, Services};
use super::{Plan, Rng};

/// One attempt of a call.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// A command is given up (`info`) after this long.
const COMMAND_DEADLINE: Duration = Duration::from_secs(90);
/// How long a referral waits for the referral service to learn its person.
const LAG_WAIT: Duration = Duration::from_secs(30);
/// How long a caseworker waits for the placement reaction's answer.
const PLACEMENT_WAIT: Duration = Duration::from_secs(20);
/// Share of acknowledged commands sent once more at once (the answer must repeat).
const PROBE: f64 = 0.1;
/// Refusals that mean "not yet": a read model behind its stream.
const LAG_REASONS: &[&str] = &["UNKNOWN_PERSON"];

const MSD: &str = "kg-msd";
const MOH: &str = "kg-moh";

/// Who sends a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Who {
    pub(crate) agency: String,
    pub(crate) role: Role,
}

impl Who {
    fn new(agency: &str, role: Role) -> Self {
        Self {
            agency: agency.to_owned(),
            role,
        }
    }

    fn police() -> Self {
        Self::new("kg-mvd", Role::Police)
    }
}

/// The kinds of command the load sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    RegisterShelter,
    Report,
    Screen,
    Decide,
    RecordConsent,
    CreateReferral,
    Accept,
    Decline,
    HoldBed,
    Admit,
    Discharge,
}

impl Kind {
    pub(crate) fn service(self) -> Service {
        match self {
            Kind::Report | Kind::Screen | Kind::Decide => Service::Identification,
            Kind::RecordConsent | Kind::CreateReferral | Kind::Accept | Kind::Decline => Service::Referral,
            Kind::RegisterShelter | Kind::HoldBed | Kind::Admit | Kind::Discharge => Service::Shelter,
        }
    }

    /// The RPC.
    pub(crate) fn rpc(self) -> &'static str {
        match self {
            Kind::RegisterShelter => "RegisterShelter",
            Kind::Report => "ReportPresumedVictim",
            Kind::Screen => "CompleteScreening",
            Kind::Decide => "DecideIdentification",
            Kind::RecordConsent => "RecordConsent",
            Kind::CreateReferral => "CreateReferral",
            Kind::Accept => "AcceptReferral",
            Kind::Decline => "DeclineReferral",
            Kind::HoldBed => "HoldBed",
            Kind::Admit => "Admit",
            Kind::Discharge => "Discharge",
        }
    }

    /// The aggregate its answer's `aggregate_id` names (the stream is `{aggregate}-{id}`).
    pub(crate) fn aggregate(self) -> &'static str {
        match self {
            Kind::Report | Kind::Screen | Kind::Decide => "case",
            Kind::RecordConsent => "consent",
            Kind::CreateReferral | Kind::Accept | Kind::Decline => "referral",
            Kind::RegisterShelter | Kind::HoldBed | Kind::Admit | Kind::Discharge => "shelter",
        }
    }
}

/// A command as sent (kept whole: a retry must carry the very same request).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    RegisterShelter(sh::RegisterShelterRequest),
    Report(id::ReportPresumedVictimRequest),
    Screen(id::CompleteScreeningRequest),
    Decide(id::DecideIdentificationRequest),
    RecordConsent(rf::RecordConsentRequest),
    CreateReferral(rf::CreateReferralRequest),
    Accept(rf::AcceptReferralRequest),
    Decline(rf::DeclineReferralRequest),
    HoldBed(sh::HoldBedRequest),
    Admit(sh::AdmitRequest),
    Discharge(sh::DischargeRequest),
}

impl Request {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Request::RegisterShelter(_) => Kind::RegisterShelter,
            Request::Report(_) => Kind::Report,
            Request::Screen(_) => Kind::Screen,
            Request::Decide(_) => Kind::Decide,
            Request::RecordConsent(_) => Kind::RecordConsent,
            Request::CreateReferral(_) => Kind::CreateReferral,
            Request::Accept(_) => Kind::Accept,
            Request::Decline(_) => Kind::Decline,
            Request::HoldBed(_) => Kind::HoldBed,
            Request::Admit(_) => Kind::Admit,
            Request::Discharge(_) => Kind::Discharge,
        }
    }

    pub(crate) fn request_id(&self) -> &str {
        match self {
            Request::RegisterShelter(r) => &r.request_id,
            Request::Report(r) => &r.request_id,
            Request::Screen(r) => &r.request_id,
            Request::Decide(r) => &r.request_id,
            Request::RecordConsent(r) => &r.request_id,
            Request::CreateReferral(r) => &r.request_id,
            Request::Accept(r) => &r.request_id,
            Request::Decline(r) => &r.request_id,
            Request::HoldBed(r) => &r.request_id,
            Request::Admit(r) => &r.request_id,
            Request::Discharge(r) => &r.request_id,
        }
    }

    /// Sets the expected version of a versioned command; false for the others.
    fn set_expected_version(&mut self, version: u64) -> bool {
        match self {
            Request::Screen(r) => r.expected_version = version,
            Request::Decide(r) => r.expected_version = version,
            Request::Accept(r) => r.expected_version = version,
            Request::Decline(r) => r.expected_version = version,
            _ => return false,
        }
        true
    }
}

/// What an acknowledged command was told.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Answer {
    /// The IDs the answer named (case and person, consent, referral, hold, shelter).
    pub(crate) ids: Vec<String>,
    pub(crate) aggregate_id: String,
    pub(crate) version: u64,
    pub(crate) event_ids: Vec<String>,
    pub(crate) replayed: bool,
}

impl Answer {
    fn new(ids: Vec<String>, result: Option<CommandResult>) -> Self {
        let result = result.unwrap_or_default();
        Self {
            ids,
            aggregate_id: result.aggregate_id,
            version: result.version,
            event_ids: result.event_ids,
            replayed: result.replayed,
        }
    }

    /// The same answer, whether or not either was marked as a replay.
    pub(crate) fn same(&self, other: &Answer) -> bool {
        self.ids == other.ids
            && self.aggregate_id == other.aggregate_id
            && self.version == other.version
            && self.event_ids == other.event_ids
    }
}

/// What the client was told in the end.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Acknowledged.
    Ok(Answer),
    /// Refused for good (`INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `PERMISSION_DENIED`, `NOT_FOUND`).
    Fail { code: Code, reason: String },
    /// Given up while the outcome is unknown.
    Info { last: String },
}

/// The answer to a later send of an acknowledged request.
#[derive(Debug, Clone)]
pub(crate) enum Replay {
    Answer(Answer),
    Refused(String),
}

/// One command of the history.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) who: Who,
    pub(crate) correlation: Uuid,
    /// The last form sent (the one acknowledged, for `ok`).
    pub(crate) request: Request,
    pub(crate) outcome: Outcome,
    pub(crate) attempts: u32,
    /// Attempts whose outcome the client could not know (timeouts, `UNAVAILABLE`, …).
    pub(crate) unknown_attempts: u32,
    /// Attempts answered `INTERNAL`.
    pub(crate) internal: u32,
    /// Answers to sending an acknowledged request once more.
    pub(crate) replays: Vec<Replay>,
}

impl Op {
    pub(crate) fn kind(&self) -> Kind {
        self.request.kind()
    }
}

/// Everything the clients were told.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// Commands sent so far (each counted once, whatever its retries).
    pub(crate) sent: AtomicU64,
    ops: StdMutex<Vec<Op>>,
    notes: StdMutex<Vec<String>>,
}

impl History {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn push(&self, op: Op) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.push(op);
        }
    }

    fn note(&self, text: String) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.push(text);
        }
    }

    pub(crate) fn ops(&self) -> Vec<Op> {
        self.ops.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// What the walkers saw that is no rule broken, but worth a look.
    pub(crate) fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

/// Clients of the three services, on lazy channels that reconnect after a restart.
#[derive(Debug, Clone)]
pub(crate) struct Clients {
    identification: IdentificationServiceClient<Channel>,
    referral: ReferralServiceClient<Channel>,
    shelter: ShelterServiceClient<Channel>,
}

impl Clients {
    pub(crate) fn new(services: &Services) -> anyhow::Result<Self> {
        let channel = |service: Service| -> anyhow::Result<Channel> {
            Ok(Channel::from_shared(services.endpoint(service))?
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy())
        };
        Ok(Self {
            identification: IdentificationServiceClient::new(channel(Service::Identification)?),
            referral: ReferralServiceClient::new(channel(Service::Referral)?),
            shelter: ShelterServiceClient::new(channel(Service::Shelter)?),
        })
    }
}

fn wrap<T>(message: T, who: &Who, correlation: Option<Uuid>) -> tonic::Request<T> {
    let token = crate::token(&who.agency, who.role, "officer-1");
    let mut request = crate::authorized(message, &token);
    if let Some(value) = correlation.and_then(|c| c.to_string().parse().ok()) {
        request.metadata_mut().insert("x-correlation-id", value);
    }
    request
}

/// Sends one attempt of `request`.
pub(crate) async fn send(
    clients: &Clients,
    request: &Request,
    who: &Who,
    correlation: Uuid,
) -> Result<Answer, tonic::Status> {
    let c = Some(correlation);
    Ok(match request {
        Request::RegisterShelter(r) => {
            let a = clients
                .shelter
                .clone()
                .register_shelter(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(vec![a.shelter_id], a.result)
        }
        Request::Report(r) => {
            let a = clients
                .identification
                .clone()
                .report_presumed_victim(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(vec![a.case_id, a.person_id], a.result)
        }
        Request::Screen(r) => {
            let a = clients
                .identification
                .clone()
                .complete_screening(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(Vec::new(), Some(a))
        }
        Request::Decide(r) => {
            let a = clients
                .identification
                .clone()
                .decide_identification(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(Vec::new(), Some(a))
        }
        Request::RecordConsent(r) => {
            let a = clients
                .referral
                .clone()
                .record_consent(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(vec![a.consent_id], a.result)
        }
        Request::CreateReferral(r) => {
            let a = clients
                .referral
                .clone()
                .create_referral(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(vec![a.referral_id], a.result)
        }
        Request::Accept(r) => {
            let a = clients
                .referral
                .clone()
                .accept_referral(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(Vec::new(), Some(a))
        }
        Request::Decline(r) => {
            let a = clients
                .referral
                .clone()
                .decline_referral(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(Vec::new(), Some(a))
        }
        Request::HoldBed(r) => {
            let a = clients
                .shelter
                .clone()
                .hold_bed(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(vec![a.hold_id], a.result)
        }
        Request::Admit(r) => {
            let a = clients
                .shelter
                .clone()
                .admit(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(Vec::new(), Some(a))
        }
        Request::Discharge(r) => {
            let a = clients
                .shelter
                .clone()
                .discharge(wrap(r.clone(), who, c))
                .await?
                .into_inner();
            Answer::new(Vec::new(), Some(a))
        }
    })
}

/// The reason code of a `FAILED_PRECONDITION`, else the status message.
fn reason(status: &tonic::Status) -> String {
    status
        .get_details_precondition_failure()
        .and_then(|p| p.violations.first().map(|v| v.r#type.clone()))
        .unwrap_or_else(|| status.message().chars().take(80).collect())
}

fn rid() -> String {
    Uuid::now_v7().to_string()
}

/// A shelter the load registered.
#[derive(Debug, Clone)]
pub(crate) struct ShelterInfo {
    pub(crate) id: String,
    operator: String,
    region: String,
    /// Beds per category (`nrm.shelter.v1.BedCategory`).
    pub(crate) beds: Vec<(i32, u32)>,
}

/// The load generator.
#[derive(Debug)]
pub(crate) struct Load {
    clients: Clients,
    history: Arc<History>,
    stop: CancellationToken,
    rate: f64,
    workers: usize,
    beds: u32,
    started: OnceLock<Instant>,
    next_case: AtomicU64,
    shelters: OnceLock<Vec<ShelterInfo>>,
}

/// Regions a shelter need names, by weight; KG-B has the fewest beds.
const NEED_REGIONS: [(&str, u64); 4] = [("KG-C", 35), ("KG-GB", 30), ("KG-O", 20), ("KG-B", 15)];

impl Load {
    pub(crate) fn new(plan: &Plan, clients: Clients, history: Arc<History>) -> Self {
        Self {
            clients,
            history,
            stop: CancellationToken::new(),
            rate: plan.rate(),
            workers: plan.workers,
            beds: plan.beds,
            started: OnceLock::new(),
            next_case: AtomicU64::new(0),
            shelters: OnceLock::new(),
        }
    }

    pub(crate) fn clients(&self) -> &Clients {
        &self.clients
    }

    pub(crate) fn shelters(&self) -> &[ShelterInfo] {
        self.shelters.get().map_or(&[], Vec::as_slice)
    }

    pub(crate) fn shelter_count(&self) -> usize {
        self.shelters().len()
    }

    /// Registers the shelters (through the history, like every command) and
    /// waits until their beds show as free.
    pub(crate) async fn setup(&self, rng: &mut Rng) -> anyhow::Result<()> {
        let women = sh::BedCategory::Women as i32;
        let men = sh::BedCategory::Men as i32;
        let layout = [("KG-C", 3), ("KG-GB", 3), ("KG-O", 2), ("KG-B", 1)];
        let mut shelters = Vec::new();
        let mut i = 0;
        for (region, count) in layout {
            for _ in 0..count {
                i += 1;
                let beds = if region == "KG-B" {
                    vec![(women, 2), (men, 1)]
                } else {
                    vec![(women, self.beds), (men, (self.beds / 2).max(1))]
                };
                let operator = format!("kg-shelter-{i:02}");
                let request = sh::RegisterShelterRequest {
                    request_id: rid(),
                    code: format!("FT-{i:02}"),
                    region: region.into(),
                    address: format!("test street {i}"),
                    capacity: beds
                        .iter()
                        .map(|&(category, beds)| sh::BedCapacity { category, beds })
                        .collect(),
                    services: vec![sh::OnSiteService::Psychological as i32],
                    wheelchair_accessible: rng.chance(0.5),
                };
                let who = Who::new(&operator, Role::Shelter);
                match self.execute(&who, Request::RegisterShelter(request), false).await {
                    Outcome::Ok(answer) => {
                        let id = answer.ids[0].clone();
                        self.approve(&id).await?;
                        shelters.push(ShelterInfo {
                            id,
                            operator,
                            region: region.into(),
                            beds,
                        });
                    }
                    other => bail!("registering shelter {i} failed: {other:?}"),
                }
            }
        }
        let expected: u32 = shelters
            .iter()
            .flat_map(|s| s.beds.iter())
            .filter(|(c, _)| *c == women)
            .map(|(_, b)| b)
            .sum();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let free = self
                .clients
                .shelter
                .clone()
                .list_free_capacity(wrap(
                    sh::ListFreeCapacityRequest {
                        region: String::new(),
                        category: women,
                    },
                    &Who::new(MSD, Role::Msd),
                    None,
                ))
                .await
                .map(|r| r.into_inner().entries.iter().map(|e| e.free).sum::<u32>());
            if free.as_ref().is_ok_and(|f| *f == expected) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the shelters' {expected} women's beds did not show as free within 60 s: {free:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.shelters.set(shelters);
        Ok(())
    }

    /// Starts the walkers.
    /// The coordinator approves a new shelter (placement and holds use
    /// approved shelters only). Part of the setup, before any fault.
    async fn approve(&self, shelter_id: &str) -> anyhow::Result<()> {
        let request = sh::ApproveShelterRequest {
            request_id: rid(),
            shelter_id: shelter_id.to_owned(),
            expected_version: 1,
        };
        let coordinator = Who::new("kg-coordinator", Role::Coordinator);
        // The short form arms the relay's abort after its first ack, so the
        // shelter service may die under this call: the same request ID is
        // sent again (the service answers a repeat with the recorded answer)
        // until the restarted service answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                self.clients
                    .shelter
                    .clone()
                    .approve_shelter(wrap(request.clone(), &coordinator, None)),
            )
            .await;
            let last = match answer {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                    ) =>
                {
                    format!("{status:?}")
                }
                Ok(Err(status)) => bail!("approving shelter {shelter_id} failed: {status:?}"),
                Err(_) => "no answer in time".to_owned(),
            };
            if Instant::now() > deadline {
                bail!("approving shelter {shelter_id}: no answer within 60 s, last: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) fn start(self: Arc<Self>, rng: Rng) -> Vec<tokio::task::JoinHandle<()>> {
        let _ = self.started.set(Instant::now());
        (0..self.workers)
            .map(|_| {
                let me = self.clone();
                let rng = rng.clone();
                tokio::spawn(async move {
                    while !me.stop.is_cancelled() {
                        let n = me.next_case.fetch_add(1, Ordering::Relaxed);
                        me.walk(n, &mut rng.fork(n)).await;
                    }
                })
            })
            .collect()
    }

    /// No new command from now on (commands under way finish).
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits until the pace allows one more command.
    async fn pace(&self) {
        let Some(started) = self.started.get() else {
            return;
        };
        while !self.stop.is_cancelled() {
            let allowed = self.rate * started.elapsed().as_secs_f64() + self.workers as f64;
            if (self.history.sent.load(Ordering::Relaxed) as f64) < allowed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a command of a case, unless the load stopped.
    async fn command(&self, who: &Who, request: Request, probe: bool) -> Option<Outcome> {
        if self.stop.is_cancelled() {
            return None;
        }
        self.pace().await;
        if self.stop.is_cancelled() {
            return None;
        }
        Some(self.execute(who, request, probe).await)
    }

    /// Sends a command until it is answered or given up, and records it.
    async fn execute(&self, who: &Who, request: Request, probe: bool) -> Outcome {
        self.history.sent.fetch_add(1, Ordering::Relaxed);
        let correlation = Uuid::now_v7();
        let started = Instant::now();
        let mut request = request;
        let mut variants: Vec<Request> = Vec::new();
        let (mut attempts, mut unknown, mut internal) = (0, 0, 0);
        let mut backoff = Duration::from_millis(50);
        let mut last;
        let outcome = loop {
            attempts += 1;
            if !variants.contains(&request) {
                variants.push(request.clone());
            }
            match tokio::time::timeout(ATTEMPT_TIMEOUT, send(&self.clients, &request, who, correlation)).await {
                Ok(Ok(answer)) => break Outcome::Ok(answer),
                Ok(Err(status)) => {
                    last = format!("{:?}: {}", status.code(), reason(&status));
                    match status.code() {
                        Code::InvalidArgument | Code::PermissionDenied | Code::NotFound | Code::Unauthenticated => {
                            break Outcome::Fail {
                                code: status.code(),
                                reason: reason(&status),
                            };
                        }
                        Code::FailedPrecondition => {
                            let why = reason(&status);
                            if LAG_REASONS.contains(&why.as_str()) && started.elapsed() < LAG_WAIT {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                            break Outcome::Fail {
                                code: status.code(),
                                reason: why,
                            };
                        }
                        Code::Aborted => {
                            if let Some(version) = self.reread(&request, who).await {
                                request.set_expected_version(version);
                            }
                        }
                        Code::AlreadyExists => {
                            // The request ID ran under another form: an earlier one committed.
                            let mut found = None;
                            for variant in variants.iter().filter(|v| **v != request) {
                                if let Ok(Ok(answer)) = tokio::time::timeout(
                                    ATTEMPT_TIMEOUT,
                                    send(&self.clients, variant, who, correlation),
                                )
                                .await
                                {
                                    found = Some((variant.clone(), answer));
                                    break;
                                }
                            }
                            if let Some((variant, answer)) = found {
                                request = variant;
                                break Outcome::Ok(answer);
                            }
                            unknown += 1;
                        }
                        // Shed at the gate before anything of it ran: known
                        // not applied, so not an unknown outcome; sent again.
                        Code::Unavailable if crate::overloaded(&status) => {}
                        Code::Internal => {
                            internal += 1;
                            unknown += 1;
                        }
                        _ => unknown += 1,
                    }
                }
                Err(_) => {
                    unknown += 1;
                    last = "no answer within 5 s".into();
                }
            }
            if started.elapsed() >= COMMAND_DEADLINE {
                break Outcome::Info { last };
            }
            let jitter = Duration::from_millis(u64::from(Uuid::now_v7().as_bytes()[15]) % 50);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        };
        let mut replays = Vec::new();
        if probe && matches!(outcome, Outcome::Ok(_)) {
            for _ in 0..3 {
                match tokio::time::timeout(ATTEMPT_TIMEOUT, send(&self.clients, &request, who, correlation)).await {
                    Ok(Ok(answer)) => {
                        replays.push(Replay::Answer(answer));
                        break;
                    }
                    Ok(Err(status))
                        if matches!(
                            status.code(),
                            Code::InvalidArgument
                                | Code::FailedPrecondition
                                | Code::PermissionDenied
                                | Code::NotFound
                                | Code::AlreadyExists
                        ) =>
                    {
                        replays.push(Replay::Refused(format!("{:?}: {}", status.code(), reason(&status))));
                        break;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        self.history.push(Op {
            who: who.clone(),
            correlation,
            request,
            outcome: outcome.clone(),
            attempts,
            unknown_attempts: unknown,
            internal,
            replays,
        });
        outcome
    }

    /// The current version of the aggregate a versioned command acts on.
    async fn reread(&self, request: &Request, who: &Who) -> Option<u64> {
        for _ in 0..3 {
            let version = match request {
                Request::Screen(id::CompleteScreeningRequest { case_id, .. })
                | Request::Decide(id::DecideIdentificationRequest { case_id, .. }) => self
                    .clients
                    .identification
                    .clone()
                    .get_case(wrap(
                        id::GetCaseRequest {
                            case_id: case_id.clone(),
                            ..Default::default()
                        },
                        who,
                        None,
                    ))
                    .await
                    .map(|c| c.into_inner().version),
                Request::Accept(rf::AcceptReferralRequest { referral_id, .. })
                | Request::Decline(rf::DeclineReferralRequest { referral_id, .. }) => {
                    self.get_referral(referral_id, who).await.map(|r| r.version)
                }
                _ => return None,
            };
            if let Ok(version) = version {
                return Some(version);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    async fn get_referral(&self, referral_id: &str, who: &Who) -> Result<rf::Referral, tonic::Status> {
        tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            self.clients.referral.clone().get_referral(wrap(
                rf::GetReferralRequest {
                    referral_id: referral_id.to_owned(),
                },
                who,
                None,
            )),
        )
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer within 5 s"))?
        .map(tonic::Response::into_inner)
    }

    /// One case from report to shelter.
    async fn walk(&self, n: u64, rng: &mut Rng) {
        let police = Who::police();
        if rng.chance(0.03) {
            // A malformed report: INVALID_ARGUMENT, and nothing written.
            let mut bad = report(n);
            bad.found_country = "K".into();
            if self.command(&police, Request::Report(bad), false).await.is_none() {
                return;
            }
        }
        let Some(Outcome::Ok(reported)) = self
            .command(&police, Request::Report(report(n)), rng.chance(PROBE))
            .await
        else {
            return;
        };
        let (Some(case_id), Some(person_id)) = (reported.ids.first().cloned(), reported.ids.get(1).cloned()) else {
            self.history.note(format!("report answered without IDs: {reported:?}"));
            return;
        };
        let screen = id::CompleteScreeningRequest {
            request_id: rid(),
            case_id: case_id.clone(),
            expected_version: reported.version,
            indicators: vec![
                id::Indicator::DocumentsRetained as i32,
                id::Indicator::WagesWithheld as i32,
            ],
        };
        let Some(Outcome::Ok(screened)) = self.command(&police, Request::Screen(screen), rng.chance(PROBE)).await
        else {
            return;
        };
        let identified = rng.chance(0.94);
        let decide = id::DecideIdentificationRequest {
            request_id: rid(),
            case_id: case_id.clone(),
            expected_version: screened.version,
            decision: if identified {
                id::Decision::Identified as i32
            } else {
                id::Decision::NotIdentified as i32
            },
            reason: if identified {
                0
            } else {
                id::NotIdentifiedReason::InsufficientIndicators as i32
            },
            // Non-punishment goes with an identification only; a decision of
            // "not identified" that carries it is refused (INVALID_ARGUMENT).
            non_punishment: rng.chance(0.3) && (identified || rng.chance(0.3)),
            best_interests_assessed: false,
        };
        let Some(Outcome::Ok(_)) = self.command(&police, Request::Decide(decide), rng.chance(PROBE)).await else {
            return;
        };
        if rng.chance(0.85) {
            let need = rng.chance(0.7).then(|| rf::ShelterNeed {
                category: if rng.chance(0.85) {
                    sh::BedCategory::Women as i32
                } else {
                    sh::BedCategory::Men as i32
                },
                region: (*rng.weighted(&NEED_REGIONS)).to_owned(),
            });
            self.refer(&case_id, &person_id, Who::new(MSD, Role::Msd), need, rng)
                .await;
        }
        if rng.chance(0.4) {
            self.refer(&case_id, &person_id, Who::new(MOH, Role::Moh), None, rng)
                .await;
        }
    }

    /// Consent, referral, answer, and the bed.
    async fn refer(&self, case_id: &str, person_id: &str, to: Who, need: Option<rf::ShelterNeed>, rng: &mut Rng) {
        let police = Who::police();
        let moh = to.role == Role::Moh;
        let purposes = if moh {
            vec![rf::ServiceKind::Medical as i32]
        } else {
            vec![rf::ServiceKind::Shelter as i32, rf::ServiceKind::Psychological as i32]
        };
        let consent = rf::RecordConsentRequest {
            request_id: rid(),
            person_id: person_id.to_owned(),
            case_id: case_id.to_owned(),
            given_by: rf::ConsentGiver::Person as i32,
            child: false,
            recipient_agency: to.agency.clone(),
            purposes,
            data_categories: vec![rf::DataCategory::Name as i32, rf::DataCategory::Phone as i32],
            ..Default::default()
        };
        let Some(Outcome::Ok(consented)) = self
            .command(&police, Request::RecordConsent(consent), rng.chance(PROBE))
            .await
        else {
            return;
        };
        let services = match (&need, moh) {
            (_, true) => vec![rf::ServiceKind::Medical as i32],
            (Some(_), false) => vec![rf::ServiceKind::Shelter as i32, rf::ServiceKind::Psychological as i32],
            (None, false) => vec![rf::ServiceKind::Psychological as i32],
        };
        let create = rf::CreateReferralRequest {
            request_id: rid(),
            person_id: person_id.to_owned(),
            case_id: case_id.to_owned(),
            receiving_agency: to.agency.clone(),
            services,
            urgency: if moh {
                rf::Urgency::Normal as i32
            } else {
                rf::Urgency::Urgent as i32
            },
            consent_id: consented.ids.first().cloned().unwrap_or_default(),
            shelter_need: need.clone(),
        };
        let Some(Outcome::Ok(created)) = self
            .command(&police, Request::CreateReferral(create), rng.chance(PROBE))
            .await
        else {
            return;
        };
        let Some(referral_id) = created.ids.first().cloned() else {
            return;
        };
        let roll = rng.below(100);
        if roll < 75 {
            let accept = rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: referral_id.clone(),
                expected_version: created.version,
            };
            let Some(Outcome::Ok(_)) = self.command(&to, Request::Accept(accept), rng.chance(PROBE)).await else {
                return;
            };
            let bed = if need.is_some() {
                self.placement(&referral_id, &to).await
            } else if moh && rng.chance(0.5) {
                self.hold_by_hand(&referral_id, &to, rng).await
            } else {
                None
            };
            if let Some((shelter_id, hold_id)) = bed {
                self.admit(&shelter_id, &hold_id, rng).await;
            }
        } else if roll < 90 {
            let decline = rf::DeclineReferralRequest {
                request_id: rid(),
                referral_id: referral_id.clone(),
                expected_version: created.version,
                reason: rf::DeclineReason::NoCapacity as i32,
            };
            let Some(Outcome::Ok(declined)) = self.command(&to, Request::Decline(decline), rng.chance(PROBE)).await
            else {
                return;
            };
            if rng.chance(0.5) {
                // Refused: NOT_AWAITING_ANSWER, and nothing written.
                let late = rf::AcceptReferralRequest {
                    request_id: rid(),
                    referral_id,
                    expected_version: declined.version,
                };
                self.command(&to, Request::Accept(late), false).await;
            }
        }
        // Else no answer: an urgent referral is escalated when its deadline passes.
    }

    /// The bed the placement reaction held for an accepted referral, if any.
    async fn placement(&self, referral_id: &str, receiver: &Who) -> Option<(String, String)> {
        let deadline = Instant::now() + PLACEMENT_WAIT;
        while Instant::now() < deadline {
            if let Ok(referral) = self.get_referral(referral_id, receiver).await {
                if !referral.hold_id.is_empty() {
                    return Some((referral.shelter_id, referral.hold_id));
                }
                if !referral.nearest_regions_with_beds.is_empty() {
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.history.note(format!(
            "no placement answer on referral {referral_id} within {} s",
            PLACEMENT_WAIT.as_secs()
        ));
        None
    }

    /// A bed held by the receiving agency itself (a referral without a shelter need).
    async fn hold_by_hand(&self, referral_id: &str, holder: &Who, rng: &mut Rng) -> Option<(String, String)> {
        let candidates: Vec<&ShelterInfo> = self.shelters().iter().filter(|s| s.region != "KG-B").collect();
        let shelter = candidates.get(usize::try_from(rng.below(candidates.len() as u64)).unwrap_or(0))?;
        let category = if rng.chance(0.5) {
            sh::BedCategory::Women as i32
        } else {
            sh::BedCategory::Men as i32
        };
        let hold = sh::HoldBedRequest {
            request_id: rid(),
            shelter_id: shelter.id.clone(),
            category,
            referral_id: referral_id.to_owned(),
            hold_minutes: 0,
        };
        match self.command(holder, Request::HoldBed(hold), rng.chance(PROBE)).await? {
            Outcome::Ok(answer) => Some((shelter.id.clone(), answer.ids.first().cloned()?)),
            _ => None,
        }
    }

    /// Admits the person a hold is for, and sometimes discharges them.
    async fn admit(&self, shelter_id: &str, hold_id: &str, rng: &mut Rng) {
        if !rng.chance(0.7) {
            return;
        }
        let Some(shelter) = self.shelters().iter().find(|s| s.id == shelter_id) else {
            self.history.note(format!(
                "a bed was held in shelter {shelter_id}, which the load did not register"
            ));
            return;
        };
        let operator = Who::new(&shelter.operator, Role::Shelter);
        let admit = sh::AdmitRequest {
            request_id: rid(),
            shelter_id: shelter_id.to_owned(),
            hold_id: hold_id.to_owned(),
        };
        let Some(Outcome::Ok(_)) = self.command(&operator, Request::Admit(admit), rng.chance(PROBE)).await else {
            return;
        };
        if rng.chance(0.4) {
            let discharge = sh::DischargeRequest {
                request_id: rid(),
                shelter_id: shelter_id.to_owned(),
                hold_id: hold_id.to_owned(),
            };
            self.command(&operator, Request::Discharge(discharge), rng.chance(PROBE))
                .await;
        }
    }
}

/// The report of made-up person `n`.
fn report(n: u64) -> id::ReportPresumedVictimRequest {
    crate::report_request(
        &rid(),
        crate::person(
            &format!("Test Person {n:05}"),
            &format!("TP{n:07}"),
            &format!("+996 555 {:03} {:03}", n / 1000 % 1000, n % 1000),
        ),
    )
}

/// Sends an acknowledged command once more, as its client would after a
/// lost answer; the answer must be the first one, marked as a replay.
pub(crate) async fn replay(clients: &Clients, op: &Op) -> anyhow::Result<Replay> {
    let mut last = None;
    for _ in 0..5 {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, send(clients, &op.request, &op.who, op.correlation)).await {
            Ok(Ok(answer)) => return Ok(Replay::Answer(answer)),
            Ok(Err(status))
                if !matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Cancelled | Code::Unknown
                ) =>
            {
                return Ok(Replay::Refused(format!("{:?}: {}", status.code(), reason(&status))));
            }
            Ok(Err(status)) => last = Some(format!("{:?}: {}", status.code(), reason(&status))),
            Err(_) => last = Some("no answer within 5 s".into()),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(anyhow::anyhow!("{last:?}")).context("the replay was never answered")
}

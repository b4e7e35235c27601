//! End to end: a gRPC `ReportPresumedVictim` until its event is on NATS.
//!
//! The identification service runs in this process ([`crate::service`]: its
//! own database, subjects and stream on the benchmark's servers). A core
//! NATS subscription on `{prefix}.identification.v1.>` sees every message the
//! relay publishes; JetStream stores a message as the server routes it to its
//! subscribers, so the moment it arrives here is the moment the stream holds
//! it (the relay's acknowledgement follows right after, one loopback hop).
//! Latency is from sending the RPC to that arrival, matched by the
//! `Nrm-Stream-Id` header (`case-<case_id>` of the response).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use nrm_kernel::auth::Role;
use nrm_kernel::bus::HEADER_STREAM_ID;
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::service::{Service, authorized, person, report_request, token};
use crate::stats::{self, RunResult};

/// One end-to-end phase.
#[derive(Debug, Clone)]
pub struct E2eResult {
    /// Reports in flight at once.
    pub concurrency: usize,
    /// Reports sent.
    pub reports: usize,
    /// From sending the RPC to its answer.
    pub rpc: RunResult,
    /// From sending the RPC to the event's arrival from NATS; `ops_per_sec`
    /// is reports per second from the first send to the last arrival.
    pub to_nats: RunResult,
    /// Events that did not arrive within 10 s of the last answer.
    pub missing: usize,
}

/// Arrival times by case ID.
#[derive(Default)]
struct Arrivals {
    at: Mutex<HashMap<String, Instant>>,
    changed: Notify,
}

/// The end-to-end measurements, one phase per entry of `concurrencies`,
/// `reports` reports each, after a short warm-up.
///
/// # Errors
/// When the service cannot start, an RPC fails or NATS fails.
pub async fn run(
    database_url: &str,
    nats_url: &str,
    reports: usize,
    concurrencies: &[usize],
) -> anyhow::Result<(Vec<E2eResult>, String)> {
    let service = Service::start(database_url, nats_url).await?;
    let outcome = measure(&service, reports, concurrencies).await;
    service.stop().await;
    outcome
}

async fn measure(
    service: &Service,
    reports: usize,
    concurrencies: &[usize],
) -> anyhow::Result<(Vec<E2eResult>, String)> {
    let nats = async_nats::connect(service.settings.nats.url.as_str())
        .await
        .context("connect to NATS")?;
    let server_version = nats.server_info().version;
    let mut subscriber = nats.subscribe(service.subjects()).await.context("subscribe")?;
    nats.flush().await.context("flush the subscription")?;
    let arrivals = Arc::new(Arrivals::default());
    let collector = {
        let arrivals = Arc::clone(&arrivals);
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let now = Instant::now();
                let case = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(HEADER_STREAM_ID))
                    .and_then(|v| v.as_str().strip_prefix("case-").map(str::to_owned));
                if let Some(case) = case {
                    arrivals.at.lock().await.entry(case).or_insert(now);
                    arrivals.changed.notify_waiters();
                }
            }
        })
    };
    let token = token("kg-mvd", Role::Police, "officer-17")?;
    // Warm-up: connections, prepared statements, the relay's first rounds.
    phase(service.client.clone(), &token, &arrivals, 0, 20.min(reports), 1).await?;
    let mut results = Vec::new();
    for (n, &concurrency) in (1..).zip(concurrencies) {
        results.push(phase(service.client.clone(), &token, &arrivals, n, reports, concurrency).await?);
    }
    collector.abort();
    Ok((results, server_version))
}

async fn phase(
    client: IdentificationServiceClient<Channel>,
    token: &str,
    arrivals: &Arc<Arrivals>,
    phase_no: usize,
    reports: usize,
    concurrency: usize,
) -> anyhow::Result<E2eResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut client = client.clone();
        let next = Arc::clone(&next);
        let token = token.to_owned();
        workers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reports {
                    break;
                }
                // Different identifiers for every report of the run.
                let serial = phase_no * 1_000_000 + i;
                let request = report_request(
                    &format!("bench-{serial}-{}", uuid::Uuid::new_v4().simple()),
                    person(
                        &fake_name(serial),
                        &format!("AC{serial:08}"),
                        &format!("+996 {serial:09}"),
                    ),
                );
                let at = Instant::now();
                let answer = client
                    .report_presumed_victim(authorized(request, &token)?)
                    .await
                    .context("ReportPresumedVictim")?
                    .into_inner();
                sent.push((answer.case_id, at, Instant::now()));
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = Vec::with_capacity(reports);
    for worker in workers {
        sent.extend(worker.await??);
    }
    let answered = Instant::now();
    // Wait for every event (at most 10 s after the last answer).
    let deadline = answered + Duration::from_secs(10);
    loop {
        let notified = arrivals.changed.notified();
        {
            let at = arrivals.at.lock().await;
            if sent.iter().all(|(case, _, _)| at.contains_key(case)) {
                break;
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    let at = arrivals.at.lock().await;
    let mut rpc = stats::new_histogram()?;
    let mut to_nats = stats::new_histogram()?;
    let mut missing = 0;
    let mut last_arrival = started;
    for (case, sent_at, answered_at) in &sent {
        stats::record(&mut rpc, *answered_at - *sent_at);
        match at.get(case) {
            Some(arrived) => {
                stats::record(&mut to_nats, arrived.saturating_duration_since(*sent_at));
                last_arrival = last_arrival.max(*arrived);
            }
            None => missing += 1,
        }
    }
    if sent.len() != reports {
        bail!("{} of {reports} reports were answered", sent.len());
    }
    Ok(E2eResult {
        concurrency,
        reports,
        rpc: RunResult::from_histogram(&rpc, answered - started, 0),
        to_nats: RunResult::from_histogram(&to_nats, last_arrival - started, 0),
        missing,
    })
}

/// A made-up name, different for every report so that no two reports look
/// like the same person (the duplicate check would otherwise grow with every one).
fn fake_name(serial: usize) -> String {
    let mut letters = String::new();
    let mut n = serial;
    loop {
        letters.push(char::from(b'a' + u8::try_from(n % 26).unwrap_or(0)));
        n /= 26;
        if n == 0 {
            break;
        }
    }
    format!("Bench Person{letters}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_names_differ() {
        assert_ne!(fake_name(1), fake_name(27));
        assert_ne!(fake_name(1), fake_name(1_000_001));
    }
}

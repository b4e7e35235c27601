//! `audit …`: the auditor's service (`nrm.common.v1.AuditService`) that
//! every Köpür service serves beside its own. Each service keeps its own
//! audit chain; `verify` and `person` ask the chosen services at once. A
//! service that does not answer is reported on stderr after the others'
//! answers (exit code 1), as in `ops …`; so is a broken chain.

use anyhow::{Result, anyhow};
use nrm_kernel::audit::{Anchor, hex};
use nrm_proto::common::v1::audit_service_client::AuditServiceClient;
use nrm_proto::common::v1::{
    AuditEntry, ChainBreak, ListEntriesRequest, ListEntriesResponse, VerifyChainRequest, VerifyChainResponse,
};

use crate::cli::audit::{AuditCommand, PersonArgs, VerifyArgs};
use crate::cli::ops::Service;
use crate::cli::{Global, Output};
use crate::enums::cli_name_of;
use crate::ops::{ask, finish, print_by_service, settle};
use crate::output::{emit, or_dash, print_table, time};

/// Runs an `audit` subcommand.
///
/// # Errors
/// When a service cannot be reached or refuses the call (`PERMISSION_DENIED`
/// for any role but `auditor`), a chain is broken, or the output cannot be
/// printed.
pub async fn run(global: &Global, command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify(args) => verify(global, args).await,
        AuditCommand::Person(args) => person(global, &args).await,
    }
}

/// `audit verify`: each chain walked; one line per service.
async fn verify(global: &Global, args: VerifyArgs) -> Result<()> {
    let services = args.service.list();
    let anchors = &args.expect_head;
    let answers = ask(global, &services, |service, channel| async move {
        let request = anchors
            .iter()
            .find(|(s, _)| *s == service)
            .map_or_else(VerifyChainRequest::default, |(_, anchor)| anchor_request(anchor));
        AuditServiceClient::new(channel).verify_chain(request).await
    })
    .await;
    let (answered, failed) = settle(answers);
    match global.output {
        Output::Json => print_by_service("nrm.common.v1.VerifyChainResponse", &answered)?,
        Output::Text => print_verified(&answered)?,
    }
    let broken: Vec<&str> = answered
        .iter()
        .filter(|(_, r)| !r.ok)
        .map(|(service, _)| service.name())
        .collect();
    if !broken.is_empty() && failed.is_empty() {
        return Err(anyhow!("the audit chain is broken: {}", broken.join(", ")));
    }
    if !broken.is_empty() {
        eprintln!("error: the audit chain is broken: {}", broken.join(", "));
    }
    finish(services.len(), failed)
}

fn anchor_request(anchor: &Anchor) -> VerifyChainRequest {
    VerifyChainRequest {
        anchor_seq: u64::try_from(anchor.seq).unwrap_or(0),
        anchor_hash: hex(&anchor.hash),
    }
}

fn print_verified(answered: &[(Service, VerifyChainResponse)]) -> Result<()> {
    if answered.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answered.iter().map(|(service, r)| verified_row(*service, r)).collect();
    print_table(&["service", "entries", "head", "result"], &rows)
}

fn verified_row(service: Service, r: &VerifyChainResponse) -> Vec<String> {
    let result = if r.ok {
        "OK".to_owned()
    } else {
        format!(
            "BROKEN at seq {}: {}: {}",
            r.broken_seq,
            cli_name_of::<ChainBreak>(r.broken),
            r.detail
        )
    };
    vec![
        service.name().to_owned(),
        r.entries_checked.to_string(),
        format!("{}:{}", r.head_seq, r.head_hash),
        result,
    ]
}

/// `audit person`: every entry concerning the person, every page, from
/// each service; merged by time.
async fn person(global: &Global, args: &PersonArgs) -> Result<()> {
    let services = args.service.list();
    let person_id = args.person_id.to_string();
    let person_id = &person_id;
    let answers = ask(global, &services, |_, channel| async move {
        let mut client = AuditServiceClient::new(channel);
        let mut all = ListEntriesResponse::default();
        loop {
            let page = client
                .list_entries(ListEntriesRequest {
                    person_id: person_id.clone(),
                    subject_id: String::new(),
                    page_size: 500,
                    page_token: all.next_page_token.clone(),
                })
                .await?
                .into_inner();
            all.entries.extend(page.entries);
            all.next_page_token = page.next_page_token;
            if all.next_page_token.is_empty() {
                return Ok(tonic::Response::new(all));
            }
        }
    })
    .await;
    let (answered, failed) = settle(answers);
    match global.output {
        Output::Json => print_by_service("nrm.common.v1.ListEntriesResponse", &answered)?,
        Output::Text => print_entries(&answered)?,
    }
    finish(services.len(), failed)
}

fn print_entries(answered: &[(Service, ListEntriesResponse)]) -> Result<()> {
    if answered.is_empty() {
        return Ok(());
    }
    let mut merged: Vec<(Service, &AuditEntry)> = answered
        .iter()
        .flat_map(|(service, r)| r.entries.iter().map(move |e| (*service, e)))
        .collect();
    merged.sort_by_key(|(service, e)| {
        let at = e.recorded_at.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
        (at, Service::ALL.iter().position(|s| s == service), e.seq)
    });
    if merged.is_empty() {
        let names: Vec<&str> = answered.iter().map(|(service, _)| service.name()).collect();
        return emit(&format!("no audit entries ({})\n", names.join(", ")));
    }
    let rows: Vec<Vec<String>> = merged.iter().map(|(service, e)| entry_row(*service, e)).collect();
    print_table(
        &[
            "when", "service", "agency", "role", "officer", "action", "subject", "outcome", "purpose",
        ],
        &rows,
    )
}

fn entry_row(service: Service, e: &AuditEntry) -> Vec<String> {
    vec![
        time(e.recorded_at.as_ref()),
        service.name().to_owned(),
        or_dash(&e.agency),
        or_dash(&e.role),
        or_dash(&e.officer),
        or_dash(&e.action),
        or_dash(&e.subject_id),
        or_dash(&e.outcome),
        or_dash(&e.purpose),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_chain_names_the_seq_and_why() {
        let r = VerifyChainResponse {
            entries_checked: 7,
            ok: false,
            broken_seq: 3,
            broken: ChainBreak::Changed.into(),
            detail: "entry 3's fields do not give its hash".into(),
            head_seq: 2,
            head_hash: "ab".into(),
        };
        assert_eq!(
            verified_row(Service::Shelter, &r),
            [
                "shelter",
                "7",
                "2:ab",
                "BROKEN at seq 3: changed: entry 3's fields do not give its hash"
            ]
        );
        let ok = VerifyChainResponse { ok: true, ..r };
        assert_eq!(verified_row(Service::Shelter, &ok)[3], "OK");
    }
}

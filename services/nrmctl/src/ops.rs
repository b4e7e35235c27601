//! `ops …`: the operator's service (`nrm.common.v1.OperatorService`) that
//! every Köpür service serves beside its own, on its own gRPC port. `parked`
//! and `refill` ask the chosen services at once and print the answers in
//! service order; a service that does not answer is reported on stderr
//! (with its name) after the others' answers, and the exit code is 1.
//! `rebuild` asks one service and exits 3 when a read model came out
//! different from the live one.

use std::fmt::Write as _;
use std::future::Future;

use anyhow::{Result, anyhow};
use nrm_proto::common::v1::operator_service_client::OperatorServiceClient;
use nrm_proto::common::v1::{
    ListParkedRequest, ListParkedResponse, ParkedItem, ParkedKind, RebuildReadModelsRequest, RebuiltReadModel,
    RefillStreamRequest, RefillStreamResponse, RetryParkedRequest,
};

use crate::cli::ops::{OpsCommand, RebuildArgs, RetryArgs, Service};
use crate::cli::{Global, Output};
use crate::enums::{cli_name, cli_name_of};
use crate::output::{self, emit, or_dash, print_fields, print_json, print_table, time};
use crate::rpc::{self, AuthChannel};

/// The operator client of one service.
type Client = OperatorServiceClient<AuthChannel>;

/// Runs an `ops` subcommand.
///
/// # Errors
/// When a service cannot be reached or refuses the call (a `tonic::Status`
/// in the chain: `PERMISSION_DENIED` for any role but `operator`), or the
/// output cannot be printed.
pub async fn run(global: &Global, command: OpsCommand) -> Result<()> {
    match command {
        OpsCommand::Parked(args) => parked(global, &args.service.list()).await,
        OpsCommand::Retry(args) => retry(global, args).await,
        OpsCommand::Refill(args) => refill(global, &args.service.publishing(), args.dry_run).await,
        OpsCommand::Rebuild(args) => rebuild(global, args).await,
    }
}

/// The exit code of `ops rebuild` when a read model came out different
/// from the live one (or could not be compared).
const DIFFERENT_EXIT: i32 = 3;

/// The endpoint option of `service`.
pub(crate) fn endpoint(global: &Global, service: Service) -> &str {
    match service {
        Service::Identification => &global.endpoint,
        Service::Referral => &global.referral_endpoint,
        Service::Shelter => &global.shelter_endpoint,
        Service::Repatriation => &global.repatriation_endpoint,
        Service::Casepath => &global.casepath_endpoint,
    }
}

/// Connects to each of `services` and makes the call `call` (given the
/// service and a channel to it), all at once; the answers in the order of
/// `services`.
pub(crate) async fn ask<T, F, Fut>(global: &Global, services: &[Service], call: F) -> Vec<(Service, Result<T>)>
where
    F: Fn(Service, AuthChannel) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let calls = services.iter().map(|&service| {
        let call = &call;
        async move {
            let answer = async {
                let channel = rpc::connect(global, endpoint(global, service)).await?;
                Ok(call(service, channel).await?.into_inner())
            }
            .await;
            (service, answer)
        }
    });
    futures::future::join_all(calls).await
}

/// The services that answered, with their answers, and those that did not.
pub(crate) type Settled<T> = (Vec<(Service, T)>, Vec<(Service, anyhow::Error)>);

pub(crate) fn settle<T>(answers: Vec<(Service, Result<T>)>) -> Settled<T> {
    let mut answered = Vec::new();
    let mut failed = Vec::new();
    for (service, answer) in answers {
        match answer {
            Ok(response) => answered.push((service, response)),
            Err(error) => failed.push((service, error)),
        }
    }
    (answered, failed)
}

/// Ok when every service answered. One service asked: its error, printed
/// by `main` as any other. Several: each error on stderr with the
/// service's name (`error: referral: UNAVAILABLE: …`), then a summary.
pub(crate) fn finish(asked: usize, mut failed: Vec<(Service, anyhow::Error)>) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    if asked == 1
        && let Some((_, error)) = failed.pop()
    {
        return Err(error);
    }
    for (service, error) in &failed {
        eprint!("{}", named_error(*service, error));
    }
    let names: Vec<&str> = failed.iter().map(|(service, _)| service.name()).collect();
    Err(anyhow!(
        "{} of {asked} services did not answer: {}",
        failed.len(),
        names.join(", ")
    ))
}

/// The error as `main` prints it, with the service's name after `error: `.
fn named_error(service: Service, error: &anyhow::Error) -> String {
    let text = output::describe_error(error);
    match text.strip_prefix("error: ") {
        Some(rest) => format!("error: {}: {rest}", service.name()),
        None => format!("{}: {text}", service.name()),
    }
}

/// Prints one JSON object whose keys are the services and whose values are
/// their answers as proto3 JSON (fields in `.proto` order).
pub(crate) fn print_by_service(full_name: &str, answers: &[(Service, impl prost::Message)]) -> Result<()> {
    let mut out = String::from("{");
    for (i, (service, message)) in answers.iter().enumerate() {
        let json = output::to_pretty_json(full_name, message)?;
        let comma = if i == 0 { "" } else { "," };
        let _ = write!(out, "{comma}\n  \"{}\": {}", service.name(), json.replace('\n', "\n  "));
    }
    out.push_str(if answers.is_empty() { "}\n" } else { "\n}\n" });
    emit(&out)
}

/// `ops parked`: one line per parked item of every service asked.
async fn parked(global: &Global, services: &[Service]) -> Result<()> {
    let answers = ask(global, services, |_, channel| async move {
        Client::new(channel).list_parked(ListParkedRequest {}).await
    })
    .await;
    let (answered, failed) = settle(answers);
    match global.output {
        Output::Json => print_by_service("nrm.common.v1.ListParkedResponse", &answered)?,
        Output::Text => print_parked(&answered)?,
    }
    finish(services.len(), failed)
}

/// The table of parked items, or `no parked items (…)` naming the services
/// that answered.
fn print_parked(answered: &[(Service, ListParkedResponse)]) -> Result<()> {
    if answered.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answered
        .iter()
        .flat_map(|(service, response)| response.items.iter().map(|item| parked_row(*service, item)))
        .collect();
    if rows.is_empty() {
        let names: Vec<&str> = answered.iter().map(|(service, _)| service.name()).collect();
        return emit(&format!("no parked items ({})\n", names.join(", ")));
    }
    print_table(
        &[
            "service",
            "kind",
            "owner",
            "item_id",
            "source",
            "subject",
            "commit_id",
            "attempts",
            "parked_at",
            "retry_requested",
            "last_error",
        ],
        &rows,
    )
}

fn parked_row(service: Service, item: &ParkedItem) -> Vec<String> {
    vec![
        service.name().to_owned(),
        cli_name_of::<ParkedKind>(item.kind),
        or_dash(&item.owner),
        or_dash(&item.item_id),
        or_dash(&item.source),
        or_dash(&item.subject),
        or_dash(&item.commit_id),
        item.attempts.to_string(),
        time(item.parked_at.as_ref()),
        item.retry_requested.to_string(),
        or_dash(&one_line(&item.last_error)),
    ]
}

/// `text` on one line: control characters become spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `ops retry`: asks one service to try one parked item again.
async fn retry(global: &Global, args: RetryArgs) -> Result<()> {
    let service = args.service;
    let request = RetryParkedRequest {
        kind: args.kind.into(),
        owner: args.owner,
        item_id: args.item_id,
    };
    let mut client = Client::new(rpc::connect(global, endpoint(global, service)).await?);
    let response = client.retry_parked(request.clone()).await?.into_inner();
    match global.output {
        Output::Json => print_json("nrm.common.v1.RetryParkedResponse", &response),
        Output::Text => {
            let kind = ParkedKind::try_from(request.kind).unwrap_or(ParkedKind::Unspecified);
            print_fields(&[
                ("service", service.name().to_owned()),
                ("kind", cli_name(kind)),
                ("owner", request.owner.clone()),
                ("item_id", request.item_id.clone()),
            ])?;
            let when = match kind {
                ParkedKind::Timer => "the timer runner fires it on its next round, within about a second",
                _ => "its runner tries it again within about a second (out of stream order)",
            };
            emit(&format!(
                "retry requested: {when}; if it fails again it stays parked with its attempts counted \
                 (see `nrmctl ops parked --service {}`)\n",
                service.name()
            ))
        }
    }
}

/// `ops refill`: each service asked compares its stream with its store and
/// requeues what the stream lacks.
async fn refill(global: &Global, services: &[Service], dry_run: bool) -> Result<()> {
    let answers = ask(global, services, |_, channel| async move {
        Client::new(channel)
            .refill_stream(RefillStreamRequest { dry_run })
            .await
    })
    .await;
    let (answered, failed) = settle(answers);
    match global.output {
        Output::Json => print_by_service("nrm.common.v1.RefillStreamResponse", &answered)?,
        Output::Text => print_refilled(&answered)?,
    }
    finish(services.len(), failed)
}

fn print_refilled(answered: &[(Service, RefillStreamResponse)]) -> Result<()> {
    if answered.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answered
        .iter()
        .map(|(service, r)| {
            vec![
                service.name().to_owned(),
                or_dash(&r.stream),
                r.stream_messages.to_string(),
                r.published_commits.to_string(),
                r.aggregates_checked.to_string(),
                r.aggregates_behind.to_string(),
                r.missing.to_string(),
                r.requeued.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "service",
            "stream",
            "stream_messages",
            "published_commits",
            "aggregates_checked",
            "aggregates_behind",
            "missing",
            "requeued",
        ],
        &rows,
    )?;
    if answered.iter().any(|(_, r)| r.requeued > 0) {
        emit("requeued commits are back in the outbox: the relay publishes them, in version order, within moments\n")?;
    }
    Ok(())
}

/// `ops rebuild`: the service rebuilds its read models (all, or the one
/// named) and compares them with the live ones; one line each. Exits with
/// [`DIFFERENT_EXIT`] when one is not equal.
async fn rebuild(global: &Global, args: RebuildArgs) -> Result<()> {
    let endpoint = args
        .service
        .map_or(global.endpoint.as_str(), |service| endpoint(global, service));
    let mut client = Client::new(rpc::connect(global, endpoint).await?);
    let response = client
        .rebuild_read_models(RebuildReadModelsRequest {
            projection: args.projection.unwrap_or_default(),
        })
        .await?
        .into_inner();
    match global.output {
        Output::Json => print_json("nrm.common.v1.RebuildReadModelsResponse", &response)?,
        Output::Text => {
            if response.read_models.is_empty() {
                emit("no read models\n")?;
            } else {
                let rows: Vec<Vec<String>> = response.read_models.iter().map(rebuilt_row).collect();
                print_table(
                    &[
                        "projection",
                        "stream",
                        "stream_sequence",
                        "messages",
                        "parked",
                        "result",
                    ],
                    &rows,
                )?;
            }
        }
    }
    let different: Vec<&str> = response
        .read_models
        .iter()
        .filter(|m| !m.equal)
        .map(|m| m.projection.as_str())
        .collect();
    if different.is_empty() {
        return Ok(());
    }
    eprintln!(
        "{} of {} read models differ from their rebuild: {}",
        different.len(),
        response.read_models.len(),
        different.join(", ")
    );
    std::process::exit(DIFFERENT_EXIT);
}

fn rebuilt_row(model: &RebuiltReadModel) -> Vec<String> {
    vec![
        or_dash(&model.projection),
        or_dash(&model.stream),
        model.stream_sequence.to_string(),
        model.messages.to_string(),
        model.parked.to_string(),
        rebuild_result(model),
    ]
}

/// `equal`, `DIFFERENT (live <8> rebuilt <8>)`, or `not compared` for a
/// read model without a digest.
fn rebuild_result(model: &RebuiltReadModel) -> String {
    if model.equal {
        return "equal".to_owned();
    }
    if model.live_digest.is_empty() && model.rebuilt_digest.is_empty() {
        return "not compared (no digest)".to_owned();
    }
    let short = |digest: &str| or_dash(&digest.chars().take(8).collect::<String>());
    format!(
        "DIFFERENT (live {} rebuilt {})",
        short(&model.live_digest),
        short(&model.rebuilt_digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuilt_read_model_is_one_line() {
        let mut model = RebuiltReadModel {
            projection: "identification_case_list".into(),
            stream: "NRM_IDENTIFICATION".into(),
            stream_sequence: 12,
            messages: 12,
            live_digest: "0123456789abcdef".into(),
            rebuilt_digest: "0123456789abcdef".into(),
            equal: true,
            parked: 0,
        };
        assert_eq!(
            rebuilt_row(&model),
            [
                "identification_case_list",
                "NRM_IDENTIFICATION",
                "12",
                "12",
                "0",
                "equal"
            ]
        );
        model.equal = false;
        model.rebuilt_digest = "fedcba9876543210".into();
        assert_eq!(rebuild_result(&model), "DIFFERENT (live 01234567 rebuilt fedcba98)");
        model.live_digest.clear();
        model.rebuilt_digest.clear();
        assert_eq!(rebuild_result(&model), "not compared (no digest)");
    }

    #[test]
    fn an_error_of_one_of_several_services_names_the_service() {
        let error = anyhow::Error::new(tonic::Status::permission_denied("role police may not ListParked"));
        assert_eq!(
            named_error(Service::Referral, &error),
            "error: referral: PERMISSION_DENIED: role police may not ListParked\n"
        );
    }

    #[test]
    fn several_services_failing_give_one_summary() {
        let failed = vec![
            (Service::Referral, anyhow!("cannot connect")),
            (Service::Shelter, anyhow!("cannot connect")),
        ];
        let error = finish(3, failed).expect_err("two failed");
        assert_eq!(error.to_string(), "2 of 3 services did not answer: referral, shelter");
        let alone = finish(1, vec![(Service::Shelter, anyhow!("cannot connect to x"))]).expect_err("one failed");
        assert_eq!(alone.to_string(), "cannot connect to x", "one service: its own error");
        assert!(finish(3, Vec::new()).is_ok());
    }

    #[test]
    fn a_parked_item_is_one_line() {
        let item = ParkedItem {
            kind: ParkedKind::Message.into(),
            owner: "identification_case_list".into(),
            item_id: "7".into(),
            source: "NRM_IDENTIFICATION".into(),
            commit_id: String::new(),
            attempts: 3,
            last_error: "decoding the commit:\nbad wire type".into(),
            parked_at: Some(prost_types::Timestamp {
                seconds: 1_740_817_800,
                nanos: 0,
            }),
            retry_requested: false,
            subject: "nrm.identification.v1.case.0197".into(),
        };
        assert_eq!(
            parked_row(Service::Identification, &item),
            [
                "identification",
                "message",
                "identification_case_list",
                "7",
                "NRM_IDENTIFICATION",
                "nrm.identification.v1.case.0197",
                "-",
                "3",
                "2025-03-01T08:30:00Z",
                "false",
                "decoding the commit: bad wire type",
            ]
        );
    }
}

//! `path`, `inbox`, `paths`, `stats`: casepath's queries
//! (`nrm.casepath.v1.CasepathService` on `--casepath-endpoint`). Each builds
//! its request from the options, calls, and prints the answer as text or
//! proto3 JSON; `--watch` prints every update of a server stream until
//! Ctrl-C or the stream ends (in JSON one object per line), and
//! `stats --csv` writes the statistics as CSV.

use std::fmt::Write as _;
use std::pin::pin;

use anyhow::Result;
use futures::StreamExt as _;
use nrm_proto::casepath::v1::casepath_service_client::CasepathServiceClient;
use nrm_proto::casepath::v1::{
    GetPathRequest, GetStatisticsRequest, Inbox, InboxItem, InboxKind, ListInboxRequest, ListPathsRequest,
    ListPathsResponse, Path, PathPart, Stage, Statistics, StepKind, step,
};

use crate::cli::casepath::{CasepathCommand, InboxArgs, PathArgs, PathsArgs, StatsArgs};
use crate::cli::{Global, Output};
use crate::enums::{ProtoEnum, cli_name_of, shown};
use crate::output::{self, emit, or_dash, print_fields, print_json, print_table, time};
use crate::rpc::{self, AuthChannel};

/// The casepath client.
type Client = CasepathServiceClient<AuthChannel>;

/// casepath's enums on the command line and in text output.
macro_rules! casepath_enums {
    ($($ty:ty),* $(,)?) => {$(
        impl ProtoEnum for $ty {
            fn from_proto_name(name: &str) -> Option<Self> {
                <$ty>::from_str_name(name)
            }
            fn proto_name(self) -> &'static str {
                self.as_str_name()
            }
        }
    )*};
}

casepath_enums!(InboxKind, PathPart, Stage, StepKind);

/// Runs a casepath command.
///
/// # Errors
/// When the service cannot be reached or refuses the call (a `tonic::Status`
/// in the chain), a watch stream fails, or the output cannot be printed.
pub async fn run(global: &Global, command: CasepathCommand) -> Result<()> {
    let mut client = Client::new(rpc::connect(global, &global.casepath_endpoint).await?);
    let output = global.output;
    match command {
        CasepathCommand::Path(args) => path(&mut client, output, args).await,
        CasepathCommand::Inbox(args) => inbox(&mut client, output, args).await,
        CasepathCommand::Paths(args) => paths(&mut client, output, args).await,
        CasepathCommand::Stats(args) => stats(&mut client, output, args).await,
    }
}

async fn path(client: &mut Client, output: Output, args: PathArgs) -> Result<()> {
    let request = GetPathRequest {
        person_id: args.person_id,
    };
    if !args.watch {
        let path = client.get_path(request).await?.into_inner();
        return print_path(output, &path);
    }
    let stream = client.watch_path(request).await?.into_inner();
    watch(stream, |path: &Path, first| match output {
        Output::Json => json_line("nrm.casepath.v1.Path", path),
        Output::Text => {
            if !first {
                emit(&format!("--- {}\n", time(path.as_of.as_ref())))?;
            }
            print_path(output, path)
        }
    })
    .await
}

async fn inbox(client: &mut Client, output: Output, args: InboxArgs) -> Result<()> {
    let mut request = ListInboxRequest {
        agency: args.agency.unwrap_or_default(),
        kind: args.kind.map_or(0, |k| InboxKind::from(k).into()),
        overdue_only: args.overdue,
        page_size: args.page.page_size.unwrap_or(0),
        page_token: args.page.page_token.unwrap_or_default(),
    };
    if args.watch {
        let stream = client.watch_inbox(request).await?.into_inner();
        return watch(stream, |inbox: &Inbox, first| match output {
            Output::Json => json_line("nrm.casepath.v1.Inbox", inbox),
            Output::Text => {
                if !first {
                    emit(&format!("--- {}\n", time(inbox.as_of.as_ref())))?;
                }
                print_inbox(output, inbox)
            }
        })
        .await;
    }
    let mut all = Inbox::default();
    loop {
        let page = client.list_inbox(request.clone()).await?.into_inner();
        all.items.extend(page.items);
        all.as_of = page.as_of;
        all.next_page_token = page.next_page_token;
        if !args.page.all || all.next_page_token.is_empty() || all.next_page_token == request.page_token {
            break;
        }
        request.page_token.clone_from(&all.next_page_token);
    }
    print_inbox(output, &all)
}

async fn paths(client: &mut Client, output: Output, args: PathsArgs) -> Result<()> {
    let mut request = ListPathsRequest {
        stage: args.stage.map_or(0, Into::into),
        overdue_only: args.overdue,
        reported_from: args.from,
        reported_to: args.to,
        page_size: args.page.page_size.unwrap_or(0),
        page_token: args.page.page_token.unwrap_or_default(),
    };
    let mut all = ListPathsResponse::default();
    loop {
        let page = client.list_paths(request.clone()).await?.into_inner();
        all.paths.extend(page.paths);
        all.next_page_token = page.next_page_token;
        if !args.page.all || all.next_page_token.is_empty() || all.next_page_token == request.page_token {
            break;
        }
        request.page_token.clone_from(&all.next_page_token);
    }
    match output {
        Output::Json => print_json("nrm.casepath.v1.ListPathsResponse", &all),
        Output::Text => {
            let rows: Vec<Vec<String>> = all
                .paths
                .iter()
                .map(|p| {
                    let person = p.person.clone().unwrap_or_default();
                    vec![
                        p.person_id.clone(),
                        cli_name_of::<Stage>(p.stage),
                        time(p.first_reported_at.as_ref()),
                        time(p.last_step_at.as_ref()),
                        p.overdue.to_string(),
                        coded_person(&person),
                    ]
                })
                .collect();
            print_table(
                &[
                    "PERSON",
                    "STAGE",
                    "FIRST REPORTED",
                    "LAST STEP",
                    "OVERDUE",
                    "WHO (CODED)",
                ],
                &rows,
            )?;
            if !all.next_page_token.is_empty() {
                emit(&format!("next_page_token: {}\n", all.next_page_token))?;
            }
            Ok(())
        }
    }
}

async fn stats(client: &mut Client, output: Output, args: StatsArgs) -> Result<()> {
    let request = GetStatisticsRequest {
        from: Some(args.from),
        to: Some(args.to),
        publishable: args.publishable,
        min_cell: args.min_cell.unwrap_or(0),
    };
    let statistics = client.get_statistics(request).await?.into_inner();
    if args.csv {
        return emit(&csv(&statistics));
    }
    match output {
        Output::Json => print_json("nrm.casepath.v1.Statistics", &statistics),
        Output::Text => {
            if !statistics.publishable {
                emit("NOT FOR PUBLICATION: exact counts for internal use\n\n")?;
            }
            print_fields(&[
                ("from", time(statistics.from.as_ref())),
                ("to", time(statistics.to.as_ref())),
                ("publishable", statistics.publishable.to_string()),
                ("min_cell", statistics.min_cell.to_string()),
                ("suppressed_cells", statistics.suppressed_cells.to_string()),
            ])?;
            emit("\n")?;
            let rows: Vec<Vec<String>> = statistics
                .counts
                .iter()
                .map(|c| {
                    // Not "<k": a complementary cell or a total may be large.
                    let count = if c.suppressed {
                        "suppressed".to_owned()
                    } else {
                        c.count.to_string()
                    };
                    vec![c.dimension.clone(), c.value.clone(), count]
                })
                .collect();
            print_table(&["DIMENSION", "VALUE", "COUNT"], &rows)?;
            emit("\n")?;
            let rows: Vec<Vec<String>> = statistics
                .times
                .iter()
                .map(|t| {
                    let (samples, median, p90) = if t.suppressed {
                        let s = || "suppressed".to_owned();
                        (s(), s(), s())
                    } else {
                        (
                            t.samples.to_string(),
                            duration(t.median.as_ref()),
                            duration(t.p90.as_ref()),
                        )
                    };
                    vec![t.measure.clone(), samples, median, p90]
                })
                .collect();
            print_table(&["MEASURE", "SAMPLES", "MEDIAN", "P90"], &rows)
        }
    }
}

/// Prints every message of a server stream until Ctrl-C or its end;
/// `print` gets the message and whether it is the first.
async fn watch<T>(mut stream: tonic::Streaming<T>, mut print: impl FnMut(&T, bool) -> Result<()>) -> Result<()> {
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    let mut first = true;
    loop {
        let message = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            next = stream.next() => match next {
                None => return Ok(()),
                Some(message) => message?,
            },
        };
        print(&message, first)?;
        first = false;
    }
}

/// `message` as one line of proto3 JSON.
fn json_line(full_name: &str, message: &impl prost::Message) -> Result<()> {
    let dynamic = output::decode(&output::descriptor_pool()?, full_name, &message.encode_to_vec())?;
    emit(&format!("{}\n", output::dynamic_to_json(&dynamic)?))
}

fn print_path(output: Output, path: &Path) -> Result<()> {
    if output == Output::Json {
        return print_json("nrm.casepath.v1.Path", path);
    }
    let parts = output::list(path.parts.iter().map(|p| cli_name_of::<PathPart>(*p)));
    let person = path.person.as_ref().map_or_else(|| "-".to_owned(), coded_person);
    print_fields(&[
        ("person_id", path.person_id.clone()),
        ("parts", parts),
        ("stage", shown_raw::<Stage>(path.stage)),
        ("person", person),
        ("as_of", time(path.as_of.as_ref())),
    ])?;
    let rows: Vec<Vec<String>> = path
        .steps
        .iter()
        .map(|s| {
            vec![
                time(s.at.as_ref()),
                cli_name_of::<StepKind>(s.kind),
                cli_name_of::<PathPart>(s.part),
                or_dash(&s.agency),
                or_dash(&s.country),
                duration(s.spent.as_ref()),
                or_dash(&s.subject_id),
                detail(s.detail.as_ref()),
            ]
        })
        .collect();
    emit("\n")?;
    print_table(
        &["AT", "STEP", "PART", "AGENCY", "COUNTRY", "SPENT", "SUBJECT", "DETAIL"],
        &rows,
    )?;
    if !path.stages.is_empty() {
        emit("\n")?;
        let rows: Vec<Vec<String>> = path
            .stages
            .iter()
            .map(|s| {
                vec![
                    cli_name_of::<Stage>(s.stage),
                    time(s.entered_at.as_ref()),
                    time(s.left_at.as_ref()),
                    duration(s.spent.as_ref()),
                ]
            })
            .collect();
        print_table(&["STAGE", "ENTERED", "LEFT", "SPENT"], &rows)?;
    }
    if !path.waiting.is_empty() {
        emit("\nwaiting:\n")?;
        print_items(&path.waiting)?;
    }
    Ok(())
}

fn print_inbox(output: Output, inbox: &Inbox) -> Result<()> {
    if output == Output::Json {
        return print_json("nrm.casepath.v1.Inbox", inbox);
    }
    emit(&format!("as_of: {}\n", time(inbox.as_of.as_ref())))?;
    print_items(&inbox.items)?;
    if !inbox.next_page_token.is_empty() {
        emit(&format!("next_page_token: {}\n", inbox.next_page_token))?;
    }
    Ok(())
}

fn print_items(items: &[InboxItem]) -> Result<()> {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                cli_name_of::<InboxKind>(i.kind),
                i.subject_id.clone(),
                i.person_id.clone(),
                or_dash(&i.agency),
                time(i.waiting_since.as_ref()),
                time(i.due_at.as_ref()),
                duration(i.time_left.as_ref()),
                if i.overdue { "OVERDUE".into() } else { String::new() },
            ]
        })
        .collect();
    print_table(
        &[
            "KIND",
            "SUBJECT",
            "PERSON",
            "AGENCY",
            "WAITING SINCE",
            "DUE",
            "LEFT",
            "",
        ],
        &rows,
    )
}

/// The coded person: gender, age band, child, citizenship, erased.
fn coded_person(person: &nrm_proto::casepath::v1::Person) -> String {
    use nrm_proto::common::v1::{AgeBand, Gender};
    let mut text = format!(
        "{} {} {}",
        shown_raw::<Gender>(person.gender),
        shown_raw::<AgeBand>(person.age_band),
        or_dash(&person.citizenship)
    );
    if person.child {
        text.push_str(" child");
    }
    if person.erased {
        text.push_str(" erased");
    }
    text
}

/// The command-line name of a raw enum number, `-` for 0.
fn shown_raw<E: ProtoEnum>(raw: i32) -> String {
    E::try_from(raw).map_or_else(|_| raw.to_string(), shown)
}

/// A short summary of a step's detail (the record and its main codes).
fn detail(detail: Option<&step::Detail>) -> String {
    use nrm_proto::referral::v1::ServiceKind;
    use nrm_proto::repatriation::v1::ReturnStatus;
    use nrm_proto::shelter::v1::BedCategory;
    match detail {
        None => "-".into(),
        Some(step::Detail::Identification(d)) => format!(
            "case {} by {} for {}",
            d.case_id,
            or_dash(&d.reporting_agency),
            or_dash(&d.competent_authority)
        ),
        Some(step::Detail::Consent(d)) => format!("consent {} for {}", d.consent_id, or_dash(&d.recipient_agency)),
        Some(step::Detail::Referral(d)) => format!(
            "referral {} {} -> {} ({})",
            d.referral_id,
            or_dash(&d.referring_agency),
            or_dash(&d.receiving_agency),
            output::list(d.services.iter().map(|s| cli_name_of::<ServiceKind>(*s)))
        ),
        Some(step::Detail::Shelter(d)) => format!(
            "hold {} at {} {} ({})",
            d.hold_id,
            or_dash(&d.shelter_code),
            or_dash(&d.region),
            shown_raw::<BedCategory>(d.category)
        ),
        Some(step::Detail::Return(d)) => format!(
            "return {} {}->{} {}",
            d.return_id,
            or_dash(&d.from_country),
            or_dash(&d.to_country),
            shown_raw::<ReturnStatus>(d.status_after)
        ),
        Some(step::Detail::Plan(d)) => format!("goal {}", d.goal_id),
    }
}

/// A duration as `1d2h3m4s` (`-` when absent; a leading `-` when negative).
fn duration(duration: Option<&prost_types::Duration>) -> String {
    let Some(d) = duration else {
        return "-".into();
    };
    let sign = if d.seconds < 0 || d.nanos < 0 { "-" } else { "" };
    let mut left = d.seconds.unsigned_abs();
    let mut text = String::from(sign);
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if left >= size {
            let _ = write!(text, "{}{unit}", left / size);
            left %= size;
        }
    }
    if left > 0 || text.len() == sign.len() {
        let _ = write!(text, "{left}s");
    }
    text
}

/// Whole seconds of a duration, for CSV.
fn seconds(duration: Option<&prost_types::Duration>) -> String {
    duration.map_or_else(String::new, |d| d.seconds.to_string())
}

/// A CSV field, quoted when it holds a separator, a quote or a line break.
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// The statistics as CSV: what they are (a first line `NOT FOR
/// PUBLICATION` when they are exact; whether publishable, the k, the
/// period), an empty line, the cells, an empty line, the times. A
/// suppressed count or time is empty, never a misleading 0.
fn csv(statistics: &Statistics) -> String {
    let mut out = String::new();
    if !statistics.publishable {
        out.push_str("NOT FOR PUBLICATION,exact counts for internal use\n");
    }
    let _ = writeln!(
        out,
        "publishable,{}\nmin_cell,{}\nfrom,{}\nto,{}\n",
        if statistics.publishable { "yes" } else { "no" },
        statistics.min_cell,
        field(&time(statistics.from.as_ref())),
        field(&time(statistics.to.as_ref())),
    );
    out.push_str("dimension,value,count,suppressed\n");
    for cell in &statistics.counts {
        let count = if cell.suppressed {
            String::new()
        } else {
            cell.count.to_string()
        };
        let _ = writeln!(
            out,
            "{},{},{count},{}",
            field(&cell.dimension),
            field(&cell.value),
            cell.suppressed
        );
    }
    out.push_str("\nmeasure,samples,median_seconds,p90_seconds,suppressed\n");
    for time in &statistics.times {
        let (samples, median, p90) = if time.suppressed {
            (String::new(), String::new(), String::new())
        } else {
            (
                time.samples.to_string(),
                seconds(time.median.as_ref()),
                seconds(time.p90.as_ref()),
            )
        };
        let _ = writeln!(
            out,
            "{},{samples},{median},{p90},{}",
            field(&time.measure),
            time.suppressed
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use nrm_proto::casepath::v1::{Cell, TimeMeasure};

    use super::*;

    #[test]
    fn durations_read_as_days_hours_minutes_seconds() {
        let d = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
        assert_eq!(duration(d(0).as_ref()), "0s");
        assert_eq!(duration(d(59).as_ref()), "59s");
        assert_eq!(duration(d(3_600).as_ref()), "1h");
        assert_eq!(duration(d(93_784).as_ref()), "1d2h3m4s");
        assert_eq!(duration(d(-90).as_ref()), "-1m30s");
        assert_eq!(duration(None), "-");
    }

    fn statistics(publishable: bool) -> Statistics {
        Statistics {
            from: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            }),
            to: Some(prost_types::Timestamp {
                seconds: 1_769_904_000,
                nanos: 0,
            }),
            publishable,
            min_cell: if publishable { 5 } else { 0 },
            counts: vec![
                Cell {
                    dimension: "gender".into(),
                    value: "total".into(),
                    count: 12,
                    suppressed: false,
                },
                Cell {
                    dimension: "gender".into(),
                    value: "GENDER_MALE".into(),
                    count: 0,
                    suppressed: true,
                },
            ],
            times: vec![
                TimeMeasure {
                    measure: "report_to_decision".into(),
                    samples: 9,
                    median: Some(prost_types::Duration {
                        seconds: 86_400,
                        nanos: 0,
                    }),
                    p90: Some(prost_types::Duration {
                        seconds: 172_800,
                        nanos: 0,
                    }),
                    suppressed: false,
                },
                TimeMeasure {
                    measure: "referral_to_answer".into(),
                    samples: 0,
                    median: None,
                    p90: None,
                    suppressed: true,
                },
            ],
            suppressed_cells: 1,
        }
    }

    #[test]
    fn csv_says_what_it_is_then_cells_then_times_with_suppressed_values_empty() {
        assert_eq!(
            csv(&statistics(true)),
            "publishable,yes\nmin_cell,5\nfrom,2026-01-01T00:00:00Z\nto,2026-02-01T00:00:00Z\n\n\
             dimension,value,count,suppressed\ngender,total,12,false\ngender,GENDER_MALE,,true\n\n\
             measure,samples,median_seconds,p90_seconds,suppressed\nreport_to_decision,9,86400,172800,false\n\
             referral_to_answer,,,,true\n"
        );
        assert_eq!(field("a,b"), "\"a,b\"");
    }

    #[test]
    fn an_exact_csv_says_not_for_publication_on_its_first_line() {
        let exact = csv(&statistics(false));
        assert_eq!(
            exact.lines().take(5).collect::<Vec<_>>(),
            vec![
                "NOT FOR PUBLICATION,exact counts for internal use",
                "publishable,no",
                "min_cell,0",
                "from,2026-01-01T00:00:00Z",
                "to,2026-02-01T00:00:00Z",
            ]
        );
        assert!(!csv(&statistics(true)).contains("NOT FOR PUBLICATION"));
    }
}
